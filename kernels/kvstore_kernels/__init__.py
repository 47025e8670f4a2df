"""KV quantization kernels: `reference` (torch), the oracle, and `triton_quant` (Triton, the
`gpu` extra; native on a GPU, interpreted in CI). The daemon never imports this package: its CPU
path is kvstore/quant (numpy), tested against `reference`. See docs/quant.md."""
