"""A Listener and a Client in two processes, authenticated with an authkey (docs example)."""
import sys

import manyproc as mp
from manyproc.connection import Client, Listener


def client(address):
    with Client(address, authkey=b"secret password") as conn:
        conn.send([2.25, None, "junk", float])
        conn.send_bytes(b"hello")
        print(conn.recv())


if __name__ == "__main__":
    mp.set_start_method(sys.argv[1])
    with Listener(("localhost", 0), authkey=b"secret password") as listener:
        p = mp.Process(target=client, args=(listener.address,))
        p.start()
        with listener.accept() as conn:
            print("connection accepted from", type(listener.last_accepted).__name__)
            print(conn.recv())
            print(conn.recv_bytes())
            conn.send("done")
        p.join()
