"""Known-harmless warnings that optional packages print on import, kept off every console script's stderr.

With the `quant` extra installed (torchao), diffusers and transformers import torchao when they load: torch
then warns that torchao registers Enum classes the old way, and diffusers that some torchao tensor types of
older releases are absent. Neither concerns jedi-train, and both would turn every one-line error into five
lines. Imported by both packages' __init__, before anything imports diffusers.
"""
import logging

_NOISE = ("is an Enum subclass and is now natively supported by torch.compile",
          "Unable to import `torchao` Tensor objects")


class _DropKnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in _NOISE)


for _name in ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).addFilter(_DropKnownNoise())
