"""A dispatcher process routes numbered tickets to desks through queues.

    main --tickets--> dispatcher --desk queues--> desk 0..2 --done--> main

Even tickets go to desk 0, odd tickets are shared by desks 1 and 2 (by ticket
number), and every desk reports back on one "done" queue.  Sentinels (None)
flow down the same path to stop everything in order.

Run it:  python examples/ticket_dispatcher.py
"""
import manyproc as mp

DESKS = 3


def dispatcher(intake, desks):
    for ticket in iter(intake.get, None):
        number = ticket["number"]
        desk = 0 if number % 2 == 0 else 1 + (number // 2) % (DESKS - 1)
        desks[desk].put(ticket)
    for queue in desks:  # pass the stop signal on to every desk
        queue.put(None)


def desk(index, inbox, done):
    for ticket in iter(inbox.get, None):
        done.put((ticket["number"], index, ticket["subject"].upper()))
    done.put(("closed", index, None))


if __name__ == "__main__":
    intake, done = mp.Queue(), mp.Queue()
    desk_queues = [mp.Queue() for _ in range(DESKS)]
    processes = [mp.Process(target=dispatcher, args=(intake, desk_queues))]
    processes += [mp.Process(target=desk, args=(i, q, done)) for i, q in enumerate(desk_queues)]
    for p in processes:
        p.start()

    tickets = [{"number": n, "subject": f"ticket about item {n}"} for n in range(12)]
    for ticket in tickets:
        intake.put(ticket)
    intake.put(None)

    handled, closed = {}, 0
    while closed < DESKS:
        number, index, subject = done.get(timeout=30)
        if number == "closed":
            closed += 1
        else:
            handled[number] = (index, subject)
    for p in processes:
        p.join()

    for number in sorted(handled):
        index, subject = handled[number]
        print(f"ticket {number:2d} -> desk {index}: {subject}")
    per_desk = [sum(1 for i, _ in handled.values() if i == d) for d in range(DESKS)]
    print("tickets per desk:", per_desk, "| all handled:", len(handled) == len(tickets))
