"""A Manager's dict and list changed by a child (the docs' server-process example)."""
import sys

import manyproc as mp


def fill(d, lst):
    d[1] = "1"
    d["2"] = 2
    d[0.25] = None
    lst.reverse()


if __name__ == "__main__":
    mp.set_start_method(sys.argv[1])
    with mp.Manager() as manager:
        d = manager.dict()
        lst = manager.list(range(10))
        p = mp.Process(target=fill, args=(d, lst))
        p.start()
        p.join()
        print(sorted(d.items(), key=str))
        print(lst)
