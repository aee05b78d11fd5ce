"""Errors raised in workers come back as themselves, with the worker's traceback.

    python examples/pool_tracebacks.py
"""

from manyproc.pool import Pool


def parse(text):
    return int(text)


if __name__ == "__main__":
    with Pool(2) as pool:
        try:
            pool.map(parse, ["1", "2", "three", "4"], chunksize=1)
        except ValueError as exc:
            print("caught:", repr(exc))
            print("notes:", getattr(exc, "__notes__", []))
            print("worker traceback:", exc.__cause__)
        # lambdas and closures work too: they travel by value
        offset = 10
        print(pool.map(lambda x: x + offset, range(3)))
