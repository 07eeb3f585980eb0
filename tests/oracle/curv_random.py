"""A transcription of curv's counter-based random numbers (runtime/curv-runtime/src/random.rs).

The oracle tests use it to feed the reference implementations exactly the probe vectors and
sampled labels that curv draws, as the issue asks ("feed both sides the same probe vectors").
"""

import math

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

    def uniform(self):
        """Uniform in [0, 1) with 53 random bits."""
        return (self.next_u64() >> 11) / float(1 << 53)

    def rademacher(self):
        return 1.0 if self.next_u64() >> 63 == 0 else -1.0

    def categorical(self, weights):
        """An index drawn with the given (unnormalised, non-negative) weights."""
        total = 0.0
        for weight in weights:  # summed in order, as Rust's `Iterator::sum` does
            total += weight
        target = self.uniform() * total
        for index, weight in enumerate(weights):
            if target < weight:
                return index
            target -= weight
        return max(len(weights) - 1, 0)


def probe(seed, step, param_index, count):
    """The Rademacher probe curv draws for parameter `param_index` at `step` (1-based)."""
    random = Random(seed, STREAM_PROBE, step * 65536 + param_index)
    return [random.rademacher() for _ in range(count)]


def sampled_labels(seed, step, logits):
    """The labels curv draws from the model at `step` for the statistic `sampled_grad` with a
    cross-entropy loss (Trainer::sampled_gradients): one categorical draw per row of `logits`, in
    order, over the weights exp(logit - max of the row)."""
    random = Random(seed, STREAM_SAMPLED_LABELS, step)
    labels = []
    for row in logits:
        row = [float(value) for value in row]
        maximum = max(row)
        labels.append(random.categorical([math.exp(value - maximum) for value in row]))
    return labels


STREAM_PRECONDITIONER = 6


def normal(random):
    """A standard normal draw from `random` as `Random::normal` makes it (Box-Muller, one value
    per call, two uniforms consumed)."""
    u1 = 1.0 - random.uniform()
    u2 = random.uniform()
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


def preconditioner_random(seed, step, param_index):
    """The generator of the `Preconditioner` stream that curv uses for parameter `param_index` at
    `step` (1-based): PSGD's noise. `param_index = 65535` is PSGD's per-step shared coin."""
    return Random(seed, STREAM_PRECONDITIONER, step * 65536 + param_index)
