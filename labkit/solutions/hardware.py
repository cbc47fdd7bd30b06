"""Reference solutions for notebooks/01_hardware_acceleration.ipynb."""


def attention_flops(batch: int, heads: int, seq_len: int, head_dim: int) -> int:
    scores = 2 * seq_len * seq_len * head_dim  # Q K^T: (T x d) @ (d x T)
    weighted = 2 * seq_len * seq_len * head_dim  # P V: (T x T) @ (T x d)
    return batch * heads * (scores + weighted)


def memory_bound(m: int, n: int, k: int, bytes_per_element: int, peak_flops: float, bandwidth: float) -> bool:
    intensity = 2 * m * n * k / ((m * k + k * n + m * n) * bytes_per_element)
    return intensity < peak_flops / bandwidth
