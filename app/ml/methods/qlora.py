"""QLoRA (Dettmers et al., 2023): LoRA over the base model quantized to 4-bit NF4 with bitsandbytes.

Needs a CUDA device and the `bitsandbytes` package (`pip install -e ".[gpu]"`): `POST /jobs` refuses it
elsewhere. The adapter is an ordinary LoRA adapter (PEFT format), served like LoRA's on the unquantized base.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.ml.device import cuda_training_available
from app.ml.methods import register
from app.ml.methods.base import MethodContext, MethodUnavailable
from app.ml.methods.lora import LoraHyperparameters, LoraMethod

if TYPE_CHECKING:
    from torch import nn


class QloraHyperparameters(LoraHyperparameters):
    pass


class QloraMethod(LoraMethod):
    name = "qlora"
    hyperparameters = QloraHyperparameters
    needs_cuda = True

    def load_base(self, ctx: MethodContext) -> nn.Module | None:
        import torch
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        if not cuda_training_available(ctx.placement.device_str):
            raise MethodUnavailable(
                "qlora needs a CUDA GPU and the bitsandbytes package, which the worker that took this job lacks "
                f"(it trains on {ctx.placement.device_str})"
            )
        compute = ctx.placement.dtype
        if compute == torch.float32:  # the 4-bit matmuls compute in half precision: bfloat16 where it is native
            native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            compute = torch.bfloat16 if native_bf16 else torch.float16
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        model = AutoModelForCausalLM.from_pretrained(
            str(ctx.models.model_dir(ctx.record)),
            quantization_config=quantization,
            dtype=compute,
            device_map={"": ctx.placement.device},
        )
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # type: ignore[no-any-return]


register(QloraMethod())
