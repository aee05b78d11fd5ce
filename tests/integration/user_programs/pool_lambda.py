"""What users try first and the standard library refuses: lambdas and closures in a pool."""
import sys

import manyproc as mp

if __name__ == "__main__":
    mp.set_start_method(sys.argv[1])
    offset = 100
    with mp.Pool(2) as pool:
        print(pool.map(lambda x: x + offset, range(5)))
        print(pool.apply(lambda: "lambda ran"))
