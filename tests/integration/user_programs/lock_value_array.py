"""Lock-protected printing, and Value/Array shared with a child (the docs' shared-state example)."""
import sys

import manyproc as mp


def locked_print(lock, i, q):
    with lock:
        q.put(i)


def change(n, a):
    n.value = 3.1415927
    for i in range(len(a)):
        a[i] = -a[i]


if __name__ == "__main__":
    mp.set_start_method(sys.argv[1])
    lock = mp.Lock()
    q = mp.SimpleQueue()
    procs = [mp.Process(target=locked_print, args=(lock, num, q)) for num in range(5)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    print(sorted(q.get() for _ in range(5)))

    num = mp.Value("d", 0.0)
    arr = mp.Array("i", range(10))
    p = mp.Process(target=change, args=(num, arr))
    p.start()
    p.join()
    print(round(num.value, 7))
    print(arr[:])
