"""Processes exchanging objects through a Queue and a Pipe, the way the docs introduce them."""
import os
import sys

import manyproc as mp


def info(title):
    return f"{title}: module {__name__}, parent {os.getppid()}, pid {os.getpid()}"


def put_hello(q):
    q.put([42, None, "hello"])


def send_hello(conn):
    conn.send([42, None, "hello"])
    conn.close()


def greet(name, q):
    q.put(info("function f") + f" hello {name}")


if __name__ == "__main__":
    mp.set_start_method(sys.argv[1])
    q = mp.Queue()
    p = mp.Process(target=put_hello, args=(q,))
    p.start()
    print(q.get())
    p.join()

    parent_conn, child_conn = mp.Pipe()
    p = mp.Process(target=send_hello, args=(child_conn,))
    p.start()
    print(parent_conn.recv())
    p.join()

    p = mp.Process(target=greet, args=("bob", q))
    p.start()
    print(q.get().split(":")[0])
    p.join()
    print("exitcodes ok", p.exitcode == 0)
