"""A counter shared by several processes: why ``+= 1`` needs the lock, and how to hold it.

``counter.value += 1`` is a read followed by a write.  Two processes can read the
same old value and both write old + 1, so increments get lost.  Holding the lock
around the read-modify-write makes it one step.

Run:  python examples/shared_counter_lock.py
"""
import manyproc as mp

WORKERS = 4
INCREMENTS = 20_000


def add_without_lock(counter):
    for _ in range(INCREMENTS):
        counter.value += 1          # two separate accesses: updates can be lost


def add_with_lock(counter, lock):
    for _ in range(INCREMENTS):
        with lock:                  # read, add and write as one step
            counter.value += 1


def run(target, *args):
    procs = [mp.Process(target=target, args=args) for _ in range(WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()


if __name__ == "__main__":
    expected = WORKERS * INCREMENTS

    # Without a lock: a raw shared int (lock=False), updated by everyone at once.
    unsafe = mp.Value("i", 0, lock=False)
    run(add_without_lock, unsafe)
    print(f"without a lock: {unsafe.value:>7} of {expected}"
          f"  ({expected - unsafe.value} increments lost)")

    # With a lock: the same raw int, every update made while holding one Lock.
    safe = mp.Value("i", 0, lock=False)
    lock = mp.Lock()
    run(add_with_lock, safe, lock)
    print(f"with a lock:    {safe.value:>7} of {expected}")

    # The usual spelling: Value comes with its own lock, reachable with get_lock().
    counter = mp.Value("i", 0)
    run(add_with_lock, counter, counter.get_lock())
    print(f"with get_lock(): {counter.value:>6} of {expected}")
    assert safe.value == counter.value == expected
