"""A producer and consumers around a JoinableQueue: join() waits until every item is done.

Run it:  python examples/joinable_queue_producer_consumer.py
"""
import manyproc as mp


def consumer(jobs, done):
    while True:
        job = jobs.get()
        try:
            if job is None:  # sentinel: stop
                return
            done.put(f"{job} packed by {mp.current_process().name}")
        finally:
            jobs.task_done()  # exactly once per get()


if __name__ == "__main__":
    jobs, done = mp.JoinableQueue(), mp.Queue()
    consumers = [mp.Process(target=consumer, args=(jobs, done), daemon=True) for _ in range(2)]
    for c in consumers:
        c.start()

    orders = [f"order-{i}" for i in range(10)]
    for order in orders:
        jobs.put(order)
    jobs.join()  # returns once every order was marked done
    print("all", len(orders), "orders processed")
    for _ in orders:
        print(" ", done.get(timeout=30))

    for _ in consumers:
        jobs.put(None)
    jobs.join()
    for c in consumers:
        c.join()
    print("consumers exited with", [c.exitcode for c in consumers])
