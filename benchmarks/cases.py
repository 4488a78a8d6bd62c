"""Parameter sets the averaging benchmarks run on, built without torchvision.

Each case is a list of parameter shapes (in the order the real model's
``parameters()`` yields them), a model dtype and an optional averaged dtype.
:func:`make_model` turns a case into an ``nn.Module`` holding exactly those
parameters, so torch's and swa_fast's ``AveragedModel`` average the same model.

The sets (counts asserted in ``tests/test_benchmark_cases.py``):

``resnet50``
    torchvision's ResNet-50 (v1.5) parameters: stem conv 64x3x7x7 + BN, four
    bottleneck stages of [3, 4, 6, 3] blocks with widths 64/128/256/512 and
    expansion 4 (conv1x1, conv3x3, conv1x1, each followed by BN weight/bias; the
    first block of every stage has a conv1x1 + BN downsample), fc 1000x2048 +
    bias. **161 tensors, 25,557,032 parameters** (102.2 MB in fp32). BatchNorm
    running statistics are buffers, not parameters, and are left out.

``transformer``
    A GPT-2-style decoder with **24 layers, d_model 512, MLP 2048**, GPT-2's
    vocabulary (50257) and context (1024): token and position embeddings, per
    layer ln1 w/b, qkv 1536x512 + b, proj 512x512 + b, ln2 w/b, fc 2048x512 + b,
    fc2 512x2048 + b (12 tensors), final ln w/b, output head tied to the token
    embedding. **292 tensors, 101,914,112 parameters** (407.7 MB in fp32).
    Chosen over GPT-2 small (12 x 768, 148 tensors, 124M) to get about twice
    as many tensors, the regime where per-tensor launch/loop overhead shows,
    while keeping the 2-core CPU run short.

``resnet50_bf16``
    The ResNet-50 set with a bf16 model and fp32 averages (``avg_dtype=float32``).

``billion`` (GPU only)
    GPT-2-style, 48 layers, d_model 1280, MLP 5120, vocab 50257, context 1024:
    **580 tensors, 1,010,159,360 parameters** (4.04 GB in fp32).

``billion_bf16`` (GPU only)
    The billion set with a bf16 model and fp32 averages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

Shape = Tuple[int, ...]

RESNET50_TENSORS = 161
RESNET50_PARAMS = 25_557_032
TRANSFORMER_TENSORS = 292
TRANSFORMER_PARAMS = 101_914_112
BILLION_TENSORS = 580
BILLION_PARAMS = 1_010_159_360


def resnet50_shapes(num_classes: int = 1000) -> List[Shape]:
    """ResNet-50's parameter shapes in torchvision's ``named_parameters()`` order."""
    shapes: List[Shape] = [(64, 3, 7, 7), (64,), (64,)]  # conv1, bn1 weight/bias
    expansion = 4
    in_channels = 64
    for blocks, width in zip((3, 4, 6, 3), (64, 128, 256, 512)):
        out_channels = width * expansion
        for block in range(blocks):
            shapes += [
                (width, in_channels, 1, 1), (width,), (width,),  # conv1, bn1
                (width, width, 3, 3), (width,), (width,),  # conv2 (stride here in v1.5), bn2
                (out_channels, width, 1, 1), (out_channels,), (out_channels,),  # conv3, bn3
            ]
            if block == 0:  # downsample: conv1x1 + BN
                shapes += [(out_channels, in_channels, 1, 1), (out_channels,), (out_channels,)]
            in_channels = out_channels
    shapes += [(num_classes, in_channels), (num_classes,)]  # fc
    return shapes


def gpt_shapes(
    layers: int, d_model: int, *, mlp_ratio: int = 4, vocab: int = 50257, context: int = 1024
) -> List[Shape]:
    """GPT-2-style decoder parameter shapes (nn.Linear layout, tied output head)."""
    d_mlp = mlp_ratio * d_model
    shapes: List[Shape] = [(vocab, d_model), (context, d_model)]  # wte, wpe
    for _ in range(layers):
        shapes += [
            (d_model,), (d_model,),  # ln1
            (3 * d_model, d_model), (3 * d_model,),  # attention qkv
            (d_model, d_model), (d_model,),  # attention output projection
            (d_model,), (d_model,),  # ln2
            (d_mlp, d_model), (d_mlp,),  # mlp fc
            (d_model, d_mlp), (d_model,),  # mlp fc2
        ]
    shapes += [(d_model,), (d_model,)]  # final ln
    return shapes


@dataclass(frozen=True)
class Case:
    name: str
    shapes: Tuple[Shape, ...]
    dtype: torch.dtype = torch.float32  # the model's dtype
    avg_dtype: Optional[torch.dtype] = None  # the averages' dtype (None: as the model)
    gpu_only: bool = False
    note: str = ""

    @property
    def num_tensors(self) -> int:
        return len(self.shapes)

    @property
    def num_params(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    @property
    def averaged_dtype(self) -> torch.dtype:
        return self.avg_dtype if self.avg_dtype is not None else self.dtype

    @property
    def model_bytes(self) -> int:
        return self.num_params * _itemsize(self.dtype)

    @property
    def averaged_bytes(self) -> int:
        return self.num_params * _itemsize(self.averaged_dtype)

    def applies_to(self, device: str) -> bool:
        return not self.gpu_only or torch.device(device).type == "cuda"


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _build_cases() -> Dict[str, Case]:
    resnet = tuple(resnet50_shapes())
    transformer = tuple(gpt_shapes(24, 512))
    billion = tuple(gpt_shapes(48, 1280))
    bf16_note = (
        "bf16 model, fp32 averages. torch's AveragedModel has no fp32-average option, so its "
        "candidates average the bf16 model into bf16 averages (less memory traffic, less precision); "
        "swa_fast uses AveragedModel(model, avg_dtype=torch.float32)."
    )
    cases = [
        Case("resnet50", resnet, note="ResNet-50 parameters, fp32"),
        Case("transformer", transformer, note="GPT-2-style 24 x 512 decoder parameters, fp32"),
        Case("resnet50_bf16", resnet, torch.bfloat16, torch.float32, note=bf16_note),
        Case("billion", billion, gpu_only=True, note="GPT-2-style 48 x 1280 decoder (~1.01B parameters), fp32"),
        Case("billion_bf16", billion, torch.bfloat16, torch.float32, gpu_only=True, note=bf16_note),
    ]
    return {case.name: case for case in cases}


CASES: Dict[str, Case] = _build_cases()


def get_case(name: str) -> Case:
    try:
        return CASES[name]
    except KeyError:
        raise KeyError(f"unknown case {name!r}; known: {', '.join(CASES)}") from None


def cases_for(device: str) -> List[Case]:
    """Every case that runs on ``device`` (GPU-only cases are left out on the CPU)."""
    return [case for case in CASES.values() if case.applies_to(device)]


class ParameterSet(nn.Module):
    """A module whose ``parameters()`` are exactly a case's shapes, in order."""

    def __init__(self, params: Sequence[nn.Parameter]):
        super().__init__()
        self.params = nn.ParameterList(params)

    def forward(self, *args, **kwargs):  # pragma: no cover - never called
        raise RuntimeError("ParameterSet only holds parameters for averaging benchmarks")


def make_model(
    case: Case, device="cpu", dtype: Optional[torch.dtype] = None, seed: int = 0
) -> ParameterSet:
    """``case``'s parameters as a module on ``device`` in ``dtype`` (default: the case's model
    dtype), filled with deterministic N(0, 0.02^2) values."""
    dtype = dtype or case.dtype
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    params = []
    with torch.no_grad():
        for shape in case.shapes:
            tensor = torch.empty(shape, device=device, dtype=dtype)
            tensor.normal_(0.0, 0.02, generator=generator)
            params.append(nn.Parameter(tensor))
    return ParameterSet(params)
