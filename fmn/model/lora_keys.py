"""Key formats of LoRA files: the one place that knows how each flavour names its tensors.

A patch is keyed by diffusers UNet parameter names (`down_blocks.1.attentions.0.
transformer_blocks.0.attn2.to_k.weight`); a LoRA factorises the weight of one *module*
(the parameter name minus `.weight`) into a down matrix A (r x in) and an up matrix B
(out x r), and the loader adds `scale * B @ A` to the weight. The flavours differ only in
how they spell the module and the two factors, and in how they say the scale:

- `peft`: diffusers/peft, what `pipe.load_lora_weights()` reads natively:
  `unet.<module>.lora_A.weight` / `unet.<module>.lora_B.weight`. The scale is
  `lora_alpha / r`, taken from a `LoraConfig` that diffusers reads out of the file's
  safetensors metadata (`lora_adapter_metadata`, keys prefixed `unet.`); see
  `peft_adapter_metadata`.
- `kohya`: kohya-ss / AUTOMATIC1111 / ComfyUI: `lora_unet_<module, dots as
  underscores>.lora_down.weight` / `.lora_up.weight`, plus a scalar `.alpha`; the scale is
  `alpha / r`. We spell modules with diffusers block names for every family: A1111 maps
  them to its own names (`convert_diffusers_name_to_compvis`), ComfyUI lists them among
  its accepted keys (`unet_to_diffusers`), and diffusers converts them back. (kohya-ss's
  own SDXL trainer writes LDM names, `lora_unet_input_blocks_4_1_...`, instead.)

Underscores are ambiguous on the way back (`to_k` vs `to.k`), so reading a kohya name
goes through a table built from the model's own module names, never through string
replaces.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

WEIGHT_SUFFIX = ".weight"
# diffusers' name for the safetensors metadata entry that holds a LoraConfig as JSON
PEFT_METADATA_KEY = "lora_adapter_metadata"
# the file name `load_lora_weights(directory)` looks for when not given weight_name
PEFT_DEFAULT_FILE = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class LoraFormat:
    """How one LoRA flavour spells a UNet module and its tensors."""

    prefix: str  # before the module name
    separator: str  # what replaces the dots inside the module name
    down: str  # A: r x in
    up: str  # B: out x r
    alpha: str | None  # scalar alpha tensor, if the flavour stores one per module

    def module_key(self, module: str) -> str:
        """The module's name in this flavour, e.g. `lora_unet_mid_block_..._to_k`."""
        return self.prefix + module.replace(".", self.separator)

    def down_key(self, module: str) -> str:
        return f"{self.module_key(module)}.{self.down}"

    def up_key(self, module: str) -> str:
        return f"{self.module_key(module)}.{self.up}"

    def alpha_key(self, module: str) -> str:
        if self.alpha is None:
            raise ValueError(f"LoRA format with prefix {self.prefix!r} stores no alpha")
        return f"{self.module_key(module)}.{self.alpha}"

    def table(self, modules: Iterable[str]) -> dict[str, str]:
        """{name in this flavour: diffusers module name} for the given modules.

        Raises if two modules would get the same name (possible in kohya spelling only in
        theory, since diffusers never puts an underscore-joined name next to a dotted one).
        """
        out: dict[str, str] = {}
        for module in modules:
            key = self.module_key(module)
            if out.setdefault(key, module) != module:
                raise ValueError(f"modules {out[key]!r} and {module!r} both map to {key!r}")
        return out


FORMATS: dict[str, LoraFormat] = {
    "peft": LoraFormat(
        prefix="unet.", separator=".", down="lora_A.weight", up="lora_B.weight", alpha=None
    ),
    "kohya": LoraFormat(
        prefix="lora_unet_",
        separator="_",
        down="lora_down.weight",
        up="lora_up.weight",
        alpha="alpha",
    ),
}
PEFT = FORMATS["peft"]
KOHYA = FORMATS["kohya"]


def module_of(param: str) -> str | None:
    """The module a weight parameter belongs to (`...to_k.weight` -> `...to_k`), else None."""
    return param.removesuffix(WEIGHT_SUFFIX) if param.endswith(WEIGHT_SUFFIX) else None


def modules_from_keys(keys: Iterable[str], fmt: LoraFormat, known: Iterable[str]) -> set[str]:
    """The diffusers modules that a LoRA file of flavour `fmt` with these keys touches.

    `known` are the model's module names (e.g. `n for n, _ in unet.named_modules()`); a key
    that names none of them is an error.
    """
    table = fmt.table(known)
    found, unknown = set(), []
    suffixes = [s for s in (fmt.down, fmt.up, fmt.alpha) if s]
    for key in keys:
        name = next((key.removesuffix("." + s) for s in suffixes if key.endswith("." + s)), None)
        if name is None or name not in table:
            unknown.append(key)
        else:
            found.add(table[name])
    if unknown:
        raise KeyError(f"{len(unknown)} LoRA keys name no module of this model: {unknown[:5]}")
    return found


def peft_adapter_metadata(ranks: dict[str, int]) -> dict[str, str]:
    """safetensors metadata that makes diffusers build a LoraConfig with scale exactly 1.

    ranks: {diffusers module name: r}. Every module gets `lora_alpha == r` (peft's scale
    is alpha / r). The most common rank is the default and the others go to
    `rank_pattern`/`alpha_pattern` under `^<module>`, which peft matches against the whole
    module name only. Without this entry diffusers guesses alpha from the ranks, which
    older releases got wrong when ranks differ between modules.
    """
    r = Counter(ranks.values()).most_common(1)[0][0]
    other = {f"^{module}": rank for module, rank in sorted(ranks.items()) if rank != r}
    config = {
        "r": r,
        "lora_alpha": r,
        "rank_pattern": other,
        "alpha_pattern": dict(other),
        "target_modules": sorted(ranks),
    }
    unet = PEFT.prefix.rstrip(".")
    return {PEFT_METADATA_KEY: json.dumps({f"{unet}.{k}": v for k, v in config.items()})}


def kohya_info_metadata(dim: int, alpha: int) -> dict[str, str]:
    """The informational `ss_*` entries kohya-ss writes, shown by A1111/ComfyUI's UIs."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(alpha),
    }
