"""ProcessPoolExecutor as concurrent.futures users write it."""
import concurrent.futures as cf
import sys

import manyproc as mp
from manyproc.futures import ProcessPoolExecutor


def is_prime(n):
    if n < 2:
        return False
    return all(n % k for k in range(2, int(n ** 0.5) + 1))


if __name__ == "__main__":
    ctx = mp.get_context(sys.argv[1])
    numbers = [112272535095293, 112582705942171, 112272535095293, 115280095190773, 97, 100]
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as executor:
        print(list(zip(numbers, executor.map(is_prime, numbers))))
        futures = {executor.submit(is_prime, n): n for n in (7, 8, 9, 11)}
        print(sorted((futures[f], f.result()) for f in cf.as_completed(futures)))
