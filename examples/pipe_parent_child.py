"""A parent and a child talking over a Pipe: requests one way, answers the other.

Run it:  python examples/pipe_parent_child.py
"""
import manyproc as mp


def calculator(conn):
    # Answer requests until the parent closes its end (EOFError) or says "stop".
    while True:
        try:
            request = conn.recv()
        except EOFError:
            break
        if request == "stop":
            break
        op, a, b = request
        conn.send({"add": a + b, "mul": a * b}[op])
    conn.close()


if __name__ == "__main__":
    parent_end, child_end = mp.Pipe()
    child = mp.Process(target=calculator, args=(child_end,))
    child.start()
    child_end.close()  # the parent keeps only its own end

    for request in [("add", 2, 3), ("mul", 6, 7), ("add", 10, -4)]:
        parent_end.send(request)
        print(request, "->", parent_end.recv())

    # Raw bytes travel too, without pickling.
    reader, writer = mp.Pipe(duplex=False)
    writer.send_bytes(b"bytes travel as they are")
    print(reader.recv_bytes().decode())

    parent_end.send("stop")
    child.join()
    print("child exit code:", child.exitcode)
