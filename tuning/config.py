"""The training config: upstream KAITO's `training_config.yaml`, validated before any model is loaded.

```yaml
training_config:            # (this top-level key is optional)
  ModelConfig:        {torch_dtype: bfloat16, chat_template: ...}
  QuantizationConfig: {load_in_4bit: true}             # transformers.BitsAndBytesConfig
  LoraConfig:         {r: 8, lora_alpha: 8}            # peft.LoraConfig
  TrainingArguments:  {num_train_epochs: 1}            # transformers.TrainingArguments
  DatasetConfig:      {train_test_split: 0.8}
  DataCollator:       {packing: true}
```

Each section is a pydantic model. The LoRA and TrainingArguments sections take any field of their
library type (checked against the library's own dataclass), and every mistake becomes one
`ConfigError` naming the section and key, with the closest valid key when there is one.
"""

from __future__ import annotations

import dataclasses
import difflib
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Method = Literal["lora", "qlora"]
DTYPES = ("float32", "bfloat16", "float16", "auto")


class ConfigError(ValueError):
    """A training config, dataset or model choice that cannot be used; the message says what to fix."""


def closest(word: str, choices: list[str] | set[str]) -> str:
    match = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelArgs(Section):
    """How the base model and its tokenizer are loaded (`from_pretrained` arguments)."""

    pretrained_model_name_or_path: str | None = None  # used when neither --model nor --preset is given
    torch_dtype: Literal[DTYPES] | None = None  # default: bfloat16 on a GPU that has it, float32 on CPU
    local_files_only: bool = True
    trust_remote_code: bool = False
    revision: str | None = None
    cache_dir: str | None = None
    device_map: str | dict[str, Any] | None = "auto"
    attn_implementation: str | None = None
    chat_template: str | None = None  # a file path or the template itself; saved with the adapter


class QuantArgs(Section):
    """transformers.BitsAndBytesConfig; QLoRA's defaults: 4-bit nf4, double quantisation, bf16 compute."""

    quant_method: Literal["bitsandbytes"] = "bitsandbytes"
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: list[str] | None = None
    llm_int8_enable_fp32_cpu_offload: bool = False
    llm_int8_has_fp16_weight: bool = False
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_quant_storage: str | None = None

    @model_validator(mode="after")
    def _one_width(self) -> QuantArgs:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are both true: choose one")
        return self

    @property
    def enabled(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit


@cache
def _library_fields(kind: str) -> dict[str, Any]:
    """The library dataclass's init fields and their types."""
    import typing

    if kind == "lora":
        from peft import LoraConfig as Lib
    else:
        from transformers import TrainingArguments as Lib
    hints = typing.get_type_hints(Lib)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(Lib) if f.init}


def _check_type(key: str, kind: str, value: Any) -> None:
    from pydantic import TypeAdapter

    try:
        TypeAdapter(_library_fields(kind)[key]).validate_python(value)
    except ValidationError as e:
        first = e.errors()[0]
        raise ValueError(f"{key}: {first['msg']}, got {value!r}") from None


class _LibrarySection(Section):
    """A section whose extra keys are passed to a library dataclass, if that dataclass has them."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    library: ClassVar[str] = ""
    refused: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError(f"must be a mapping of keys to values, not {type(data).__name__}")  # noqa: TRY004 (pydantic)
        refused = cls.refused
        for key in data:
            if key in refused:
                raise ValueError(f"{key!r} cannot be set here: {refused[key]}")
        if set(data) <= set(cls.model_fields):  # no need to import the library
            return data
        library = _library_fields(cls.library)
        allowed = set(library) | set(cls.model_fields)
        for key in data:
            if key not in allowed:
                raise ValueError(f"unknown key {key!r}{closest(str(key), allowed - set(refused))}")
            if key not in cls.model_fields:
                _check_type(key, cls.library, data[key])
        return data

    def kwargs(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class LoraArgs(_LibrarySection):
    """peft.LoraConfig. Without target_modules, every linear layer of the model but the output head."""

    library = "lora"
    refused = {"task_type": "it is always CAUSAL_LM", "base_model_name_or_path": "it comes from --model/--preset"}
    r: int = Field(8, ge=1)
    lora_alpha: float = 8
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str | None = None
    bias: Literal["none", "all", "lora_only"] = "none"


class TrainArgs(_LibrarySection):
    """transformers.TrainingArguments; output_dir is resolved inside the output root (--output)."""

    library = "train"
    refused = {"push_to_hub": "the adapter is pushed with --push (oras), not to the Hugging Face hub",
                "resume_from_checkpoint": "a rerun of the same command resumes from the last checkpoint"}
    output_dir: str | None = None
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = Field(4, ge=1)
    learning_rate: float = 2e-4
    logging_steps: float = 1
    save_strategy: str = "steps"
    save_steps: float = 50
    save_total_limit: int | None = 2
    report_to: str | list[str] = "none"


class DatasetArgs(Section):
    """Which columns hold the data and how it is split. Column defaults: `messages`, else
    `prompt` + `completion`, else `text`."""

    dataset_path: str | None = None  # a file or folder inside the data root (--data), as upstream's /data
    dataset_extension: Literal["jsonl", "json", "csv", "parquet"] | None = None
    shuffle_dataset: bool = True
    shuffle_seed: int = 42
    context_column: str | None = None
    response_column: str | None = None
    messages_column: str | None = None
    train_test_split: float = Field(0.8, gt=0, le=1)  # the training fraction; 1 = no evaluation set
    max_seq_length: int = Field(2048, ge=8)


class CollatorArgs(Section):
    """How examples become batches. Upstream's DataCollatorForLanguageModeling keys are accepted for
    causal LM (mlm: false); `packing` concatenates a batch's examples into one row with per-example
    positions, so nothing is padded and attention never crosses examples; `completion_only_loss`
    masks prompt tokens."""

    mlm: Literal[False] = False
    pad_to_multiple_of: int | None = None
    return_tensors: Literal["pt"] = "pt"
    packing: bool = True
    completion_only_loss: bool = True


SECTIONS: dict[str, type[Section]] = {
    "ModelConfig": ModelArgs,
    "QuantizationConfig": QuantArgs,
    "LoraConfig": LoraArgs,
    "TrainingArguments": TrainArgs,
    "DatasetConfig": DatasetArgs,
    "DataCollator": CollatorArgs,
}


class TrainingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Method = "lora"
    ModelConfig: ModelArgs = Field(default_factory=ModelArgs)
    QuantizationConfig: QuantArgs | None = None
    LoraConfig: LoraArgs = Field(default_factory=LoraArgs)
    TrainingArguments: TrainArgs = Field(default_factory=TrainArgs)
    DatasetConfig: DatasetArgs = Field(default_factory=DatasetArgs)
    DataCollator: CollatorArgs = Field(default_factory=CollatorArgs)

    @property
    def quantization(self) -> QuantizationConfig | None:
        q = self.QuantizationConfig
        return q if q is not None and q.enabled else None

    def resolved(self) -> dict[str, Any]:
        """The config as it ran (what `training_config.yaml` in the output dir holds)."""
        data = self.model_dump(mode="json", exclude_none=True)
        return {"method": data.pop("method"), "training_config": data}


def _format(section: str, err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        field = str(first["loc"][-1])
        known = set(SECTIONS[section].model_fields)
        return f"{section}: unknown key {field!r}{closest(field, known)}"
    if first["type"] == "literal_error":
        msg = f"{msg}, got {first['input']!r}"
    return f"{section}{'.' + where if where else ''}: {msg}"


def parse_config(data: dict[str, Any] | None, method: Method, output_root: Path) -> TrainingConfig:
    """Validate a training config (the YAML's mapping) for `method`; raises ConfigError."""
    data = dict(data or {})
    if set(data) == {"training_config"} or "training_config" in data:
        extra = set(data) - {"training_config"}
        if extra:
            raise ConfigError(f"unknown top-level key {min(extra)!r}: everything goes under training_config")
        data = dict(data["training_config"] or {})
    if not isinstance(data, dict):
        raise ConfigError("training_config must be a mapping of sections")
    sections: dict[str, Any] = {}
    for name, value in data.items():
        if name not in SECTIONS:
            raise ConfigError(f"unknown section {name!r}{closest(str(name), set(SECTIONS))}; "
                              f"sections are {', '.join(SECTIONS)}")
        try:
            sections[name] = SECTIONS[name].model_validate(value or {})
        except ValidationError as e:
            raise ConfigError(_format(name, e)) from None
    quant = sections.get("QuantizationConfig")
    if method == "lora" and quant is not None and quant.enabled:
        raise ConfigError("method lora does not quantise the model, but QuantizationConfig has "
                          f"load_in_{'4' if quant.load_in_4bit else '8'}bit: true; use --method qlora or remove it")
    if method == "qlora":
        if quant is None:
            sections["QuantizationConfig"] = QuantArgs(load_in_4bit=True)
        elif not quant.enabled:
            raise ConfigError("method qlora needs a quantised model: set QuantizationConfig.load_in_4bit "
                              "(or load_in_8bit) to true, or use --method lora")
    cfg = TrainingConfig(method=method, **sections)
    cfg.TrainingArguments.output_dir = str(resolve_output_dir(cfg.TrainingArguments.output_dir, output_root))
    return cfg


def resolve_output_dir(value: str | None, root: Path) -> Path:
    root = root.expanduser().resolve()
    if not value:
        return root
    path = Path(value).expanduser()
    path = (path if path.is_absolute() else root / path).resolve()
    if path != root and root not in path.parents:
        raise ConfigError(f"TrainingArguments.output_dir {value!r} is outside the output root {root}: "
                          "give a path inside it (or change --output)")
    return path


def load_config(path: Path | None, method: Method, output_root: Path) -> TrainingConfig:
    """Read and validate a config file; a missing file means the method's defaults."""
    data = None
    if path is not None:
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping (training_config: ...), not {type(data).__name__}")
    try:
        return parse_config(data, method, output_root)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
