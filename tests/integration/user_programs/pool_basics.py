"""The docs' Pool tour: map, imap_unordered, apply_async, a timeout, and an error coming back."""
import os
import sys
import time

import manyproc as mp


def square(x):
    return x * x


def fail(x):
    raise ValueError(f"bad value {x}")


if __name__ == "__main__":
    mp.set_start_method(sys.argv[1])
    with mp.Pool(processes=2) as pool:
        print(pool.map(square, range(10)))
        print(sorted(pool.imap_unordered(square, range(10))))
        res = pool.apply_async(square, (20,))
        print(res.get(timeout=10))
        res = pool.apply_async(os.getpid, ())
        print(isinstance(res.get(timeout=10), int))
        multiple = [pool.apply_async(os.getpid, ()) for _ in range(4)]
        print(len([r.get(timeout=10) for r in multiple]))
        res = pool.apply_async(time.sleep, (10,))
        try:
            res.get(timeout=0.5)
        except mp.TimeoutError:
            print("We lacked patience and got a multiprocessing.TimeoutError")
        try:
            pool.apply(fail, (3,))
        except ValueError as exc:
            print("worker error came back:", exc)
        print(pool.starmap(pow, [(2, 3), (3, 2)]))
        print(list(pool.imap(square, range(5))))
    print("pool closed")
