"""KV quantization kernels: `reference` (torch), the oracle. The daemon never imports this
package: its CPU path is kvstore/quant (numpy), tested against `reference`. See docs/quant.md."""
