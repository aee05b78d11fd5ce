"""A child process changes a Value and an Array; the parent sees the changes.

Value and Array live in shared memory, so the child works on the parent's own
numbers, not on copies.  Pass them to the child as Process arguments.

Run:  python examples/value_array_child.py [fork|spawn|forkserver]
"""
import sys

import manyproc as mp


def child(number, squares, greeting):
    number.value = 3.1415927
    for i in range(len(squares)):
        squares[i] = squares[i] ** 2
    greeting.value = b"hello from " + mp.current_process().name.encode()


if __name__ == "__main__":
    ctx = mp.get_context(sys.argv[1] if len(sys.argv) > 1 else None)
    number = ctx.Value("d", 0.0)            # a C double
    squares = ctx.Array("i", range(10))     # ten C ints, initialised from a range
    greeting = ctx.Array("c", 40)           # 40 bytes; .value reads up to the first NUL

    p = ctx.Process(target=child, args=(number, squares, greeting))
    p.start()
    p.join()

    print("start method:", ctx.get_start_method())
    print("number:  ", number.value)
    print("squares: ", squares[:])
    print("greeting:", greeting.value.decode())
