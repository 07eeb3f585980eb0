"""A transcription of curv's counter-based random numbers (runtime/curv-runtime/src/random.rs).

The oracle tests use it to feed the reference implementations exactly the probe vectors and
sampled labels that curv draws, as the issue asks ("feed both sides the same probe vectors").
"""

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15

STREAM_SPLIT = 1
STREAM_SHUFFLE = 2
STREAM_INIT = 3
STREAM_PROBE = 4
STREAM_SAMPLED_LABELS = 5


def mix(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


class Random:
    def __init__(self, seed, stream, key):
        inner = (((mix(seed ^ 0x6A09E667F3BCC909) + stream) & MASK) * GOLDEN) & MASK
        self.state = mix(inner ^ mix(key))

    def next_u64(self):
        self.state = (self.state + GOLDEN) & MASK
        return mix(self.state)

    def rademacher(self):
        return 1.0 if self.next_u64() >> 63 == 0 else -1.0


def probe(seed, step, param_index, count):
    """The Rademacher probe curv draws for parameter `param_index` at `step` (1-based)."""
    random = Random(seed, STREAM_PROBE, step * 65536 + param_index)
    return [random.rademacher() for _ in range(count)]
