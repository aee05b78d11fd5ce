"""The first program users run: processes, and a pool mapping a lambda."""
import manyproc as mp


def hello(name):
    print("Hello", name, "from", mp.current_process().name)


if __name__ == "__main__":
    p = mp.Process(target=hello, args=("Alice",))
    p.start()
    p.join()
    print("exit code", p.exitcode)
