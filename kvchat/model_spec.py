"""Hyper-parameters that decide memory, read from GGUF metadata.

`spec_from_header` mirrors how llama.cpp fills `llama_hparams` (src/llama-model.cpp
`load_hparams`, the per-architecture `src/models/<arch>.cpp` `load_arch_hparams`,
and src/llama-hparams.cpp) for what the planner needs: per-layer KV heads and head
sizes, which layers are sliding-window and the window, MLA latent caches, recurrent
state sizes, layers without KV, vocabulary, training context, and the bytes of every
tensor by layer (for GPU placement).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvchat.errors import ModelFormatError
from kvchat.gguf import GGUFHeader, StringArray, iter_layer_tensors

# Architectures llama.cpp runs without any KV memory (encoders, diffusion models):
# llama_model::create_memory returns nullptr for them.
NO_MEMORY_ARCHS = frozenset(
    {"bert", "jina-bert-v2", "jina-bert-v3", "nomic-bert", "nomic-bert-moe", "neo-bert", "eurobert",
     "wavtokenizer-dec", "modern-bert", "gemma-embedding", "dream", "llada", "llada-moe", "rnd1"}
)
# llm_arch_is_recurrent (src/llama-arch.cpp)
RECURRENT_ARCHS = frozenset({"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"})
# llm_arch_is_hybrid (src/llama-arch.cpp), those whose layer split kvchat knows
HYBRID_ARCHS = frozenset(
    {"jamba", "falcon-h1", "granitehybrid", "lfm2", "lfm2moe", "nemotron_h", "nemotron_h_moe", "qwen3next",
     "qwen35", "qwen35moe", "plamo2", "kimi_linear", "minimax-01", "bailingmoe3"}
)


@dataclass(frozen=True)
class _SwaRule:
    """How an architecture marks its sliding-window layers (src/models/<arch>.cpp)."""

    pattern: int  # every `pattern`-th layer is dense (set_swa_pattern); 0: all SWA
    dense_first: bool = False
    default_window: int = 0  # used when the GGUF has no sliding_window key
    needs_window: bool = False  # SWA only when the GGUF's window is > 0
    chunked: bool = False  # llama4's chunked attention
    array_only: bool = False  # the pattern must be a per-layer array in the GGUF


_SWA_RULES: dict[str, _SwaRule] = {
    "gemma2": _SwaRule(2, default_window=4096),
    "gemma3": _SwaRule(6, needs_window=True),
    "gemma3n": _SwaRule(5),
    "gemma4": _SwaRule(0, array_only=True),
    "cohere2": _SwaRule(4),
    "cohere2moe": _SwaRule(4, dense_first=True),
    "gpt-oss": _SwaRule(2),
    "llama4": _SwaRule(4, default_window=8192, chunked=True),
    "olmo2": _SwaRule(4, needs_window=True),
    "afmoe": _SwaRule(4, needs_window=True),
    "mellum": _SwaRule(4, needs_window=True),
    "exaone-moe": _SwaRule(4, default_window=128),
    "muse-glimmer": _SwaRule(4),
    "mimo2": _SwaRule(0, array_only=True),
    "maple": _SwaRule(0, array_only=True),
    "granite-swa": _SwaRule(0, array_only=True),
}


@dataclass(frozen=True)
class HeaderVocabulary:
    """A vocabulary as the GGUF header states it, to check a draft model against its
    target before anything loads (kvchat.speculative.vocab_mismatch). None: the header
    leaves that value to the tokenizer's default."""

    tokens: Sequence[str]
    bos_token: int | None
    eos_token: int | None
    add_bos: bool | None

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def token_text(self, token: int) -> str:
        return self.tokens[token]


@dataclass(frozen=True)
class ModelSpec:
    """What a model's memory depends on. Per-layer tuples have `n_layer` entries."""

    architecture: str
    name: str | None
    n_layer: int  # block_count (llama.cpp's n_layer_all)
    n_layer_nextn: int  # trailing MTP layers, never attended by the main graph
    n_embd: int
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    head_dim_k: tuple[int, ...]  # per layer: the SWA or full-attention size
    head_dim_v: tuple[int, ...]
    is_swa: tuple[bool, ...]
    n_swa: int
    swa_chunked: bool
    is_mla: bool  # latent cache: K only (kv_lora_rank + rope dims), no V
    has_kv: tuple[bool, ...]  # layer owns attention K/V cells
    is_recurrent: tuple[bool, ...]  # layer owns a recurrent state instead
    n_embd_r: int  # recurrent conv/shift state per layer per sequence, f32 elements
    n_embd_s: int  # recurrent ssm/wkv state per layer per sequence, f32 elements
    has_memory: bool  # False for encoders: llama.cpp allocates no KV at all
    n_vocab: int
    n_ctx_train: int
    layer_bytes: tuple[int, ...]  # weights of blk.N.* tensors
    input_bytes: int  # token embeddings and other tensors outside the blocks
    output_bytes: int  # the output head (output.weight, output_norm...)
    output_is_tied: bool  # no output.weight: llama.cpp reuses token_embd (a copy if offloaded)
    tied_output_bytes: int  # bytes of that copy
    file_type: int | None = None
    n_ff_max: int = 0  # widest feed_forward_length (dense FFN), 0 where the GGUF gives none
    vocabulary: HeaderVocabulary | None = field(default=None, compare=False, repr=False)

    @property
    def n_layer_main(self) -> int:
        return self.n_layer - self.n_layer_nextn

    @property
    def is_hybrid(self) -> bool:
        return any(self.is_recurrent) and any(self.has_kv)

    @property
    def memory_type(self) -> str:
        """standard, sliding-window, recurrent or hybrid: what rolling back costs
        (see kvchat.session: the last three need checkpoints)."""
        if self.is_hybrid:
            return "hybrid"
        if any(self.is_recurrent):
            return "recurrent"
        if any(self.is_swa):
            return "sliding-window"
        return "standard"

    def n_embd_k_gqa(self, il: int) -> int:
        return self.head_dim_k[il] * self.n_head_kv[il]

    def n_embd_v_gqa(self, il: int) -> int:
        return self.head_dim_v[il] * self.n_head_kv[il]

    def n_embd_v_gqa_max(self) -> int:
        """Widest V row of any layer: without flash attention V is padded to it."""
        return max((self.n_embd_v_gqa(il) for il in range(self.n_layer)), default=0)

    @property
    def weights_bytes(self) -> int:
        return self.input_bytes + sum(self.layer_bytes) + self.output_bytes


class _Meta:
    """Typed access to `{arch}.*` keys, with llama.cpp's get_key/get_key_or_arr rules."""

    def __init__(self, metadata: dict[str, Any], arch: str, n_layer: int) -> None:
        self.md = metadata
        self.arch = arch
        self.n_layer = n_layer

    def key(self, suffix: str) -> str:
        return f"{self.arch}.{suffix}"

    def get(self, suffix: str, default: Any = None) -> Any:
        return self.md.get(self.key(suffix), default)

    def uint(self, suffix: str, default: int | None = None, *, required: bool = False) -> int:
        value = self.md.get(self.key(suffix))
        if value is None:
            if required:
                raise ModelFormatError(
                    f"GGUF metadata lacks {self.key(suffix)}",
                    hint="the file is incomplete or for an architecture kvchat cannot plan",
                )
            return 0 if default is None else default
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ModelFormatError(f"GGUF metadata {self.key(suffix)} = {value!r} is not a count")
        return value

    def per_layer(self, suffix: str, default: int | tuple[int, ...]) -> tuple[int, ...]:
        """A scalar broadcast to every layer, or a per-layer array of exactly n_layer."""
        value = self.md.get(self.key(suffix))
        if value is None:
            return default if isinstance(default, tuple) else (default,) * self.n_layer
        if isinstance(value, list):
            items = value
            if len(items) != self.n_layer:
                raise ModelFormatError(
                    f"GGUF metadata {self.key(suffix)} has {len(items)} entries for {self.n_layer} layers",
                    hint="the file is damaged",
                )
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in items):
                raise ModelFormatError(f"GGUF metadata {self.key(suffix)} holds non-counts")
            return tuple(int(v) for v in items)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ModelFormatError(f"GGUF metadata {self.key(suffix)} = {value!r} is not a count")
        return (value,) * self.n_layer


def _swa_pattern(n_layer: int, n_pattern: int, dense_first: bool) -> tuple[bool, ...]:
    """llama_hparams::set_swa_pattern (src/llama-hparams.cpp)."""
    if dense_first:
        return tuple(n_pattern == 0 or il % n_pattern != 0 for il in range(n_layer))
    return tuple(n_pattern == 0 or il % n_pattern < n_pattern - 1 for il in range(n_layer))


def _sliding_window(m: _Meta, n_layer: int) -> tuple[tuple[bool, ...], int, bool]:
    """(is_swa per layer, window, chunked), as the architecture's load_arch_hparams sets them."""
    none = ((False,) * n_layer, 0, False)
    window_key = m.get("attention.sliding_window")
    pattern_value = m.get("attention.sliding_window_pattern")
    rule = _SWA_RULES.get(m.arch)
    if rule is None:
        # unknown to kvchat: trust an explicit window plus pattern
        if not window_key or pattern_value is None:
            return none
        rule = _SwaRule(0)
    window = int(window_key) if isinstance(window_key, int) else rule.default_window
    if rule.chunked and window_key == 0:
        return none  # llama4 with sliding_window 0: plain attention
    if rule.chunked:
        window = rule.default_window  # llama4 keeps its 8192-token chunks
    if rule.needs_window and not window:
        return none
    if isinstance(pattern_value, list):
        flags = pattern_value
        if len(flags) > n_layer:
            raise ModelFormatError(
                f"{m.key('attention.sliding_window_pattern')} has {len(flags)} entries for {n_layer} layers",
                hint="the file is damaged",
            )
        is_swa = tuple(bool(f) for f in flags) + (False,) * (n_layer - len(flags))
    elif rule.array_only:
        raise ModelFormatError(
            f"GGUF metadata lacks the per-layer {m.key('attention.sliding_window_pattern')}",
            hint="the file is incomplete",
        )
    else:
        n_pattern = int(pattern_value) if isinstance(pattern_value, int) else rule.pattern
        is_swa = _swa_pattern(n_layer, n_pattern, rule.dense_first)
    if not any(is_swa):
        return none
    return is_swa, window, rule.chunked


def _recurrent_layers(m: _Meta, n_layer: int, n_layer_main: int, n_head_kv: tuple[int, ...],
                      n_ff: tuple[int, ...]) -> tuple[bool, ...]:
    """Which layers keep a recurrent state (is_recr in the arch's load_arch_hparams)."""
    arch = m.arch
    if arch in RECURRENT_ARCHS:
        return (True,) * n_layer
    if arch not in HYBRID_ARCHS:
        return (False,) * n_layer
    if arch == "falcon-h1":  # every layer has both attention and an SSM
        return (True,) * n_layer
    if arch in ("qwen3next", "qwen35", "qwen35moe", "kimi_linear", "minimax-01"):
        explicit = m.get("attention.recurrent_layers")
        if explicit is not None:
            flags = m.per_layer("attention.recurrent_layers", 0)
            return tuple(bool(f) for f in flags)
        interval = m.uint("full_attention_interval", 4) or 4
        return tuple(il < n_layer_main and (il + 1) % interval != 0 for il in range(n_layer))
    if arch in ("nemotron_h", "nemotron_h_moe"):
        return tuple(il < n_layer_main and n_head_kv[il] == 0 and n_ff[il] == 0 for il in range(n_layer))
    # jamba, granitehybrid, lfm2, plamo2...: a layer is recurrent iff it has no KV heads
    return tuple(n_head_kv[il] == 0 for il in range(n_layer))


def _recurrent_state(m: _Meta, n_embd: int, n_head: int) -> tuple[int, int]:
    """(n_embd_r, n_embd_s): llama_hparams::n_embd_r / n_embd_s (src/llama-hparams.cpp)."""
    wkv_head_size = m.uint("wkv.head_size")
    if wkv_head_size:  # RWKV: token shift states and the wkv state
        return m.uint("token_shift_count", 2) * n_embd, n_embd * wkv_head_size
    l_cache = m.uint("shortconv.l_cache")
    if l_cache:  # LFM2 short convolutions: no ssm state
        return n_embd * (l_cache - 1), 0
    d_conv = m.uint("ssm.conv_kernel")
    d_inner = m.uint("ssm.inner_size")
    d_state = m.uint("ssm.state_size")
    n_group = m.uint("ssm.group_count")
    n_conv = (d_conv - 1 if d_conv > 0 else 0) * (d_inner + 2 * n_group * d_state)
    return n_conv, d_state * d_inner


def _vocab_size(md: dict[str, Any], arch: str) -> int:
    value = md.get(f"{arch}.vocab_size")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    tokens = md.get("tokenizer.ggml.tokens")
    if tokens is not None and hasattr(tokens, "__len__"):
        return len(tokens)
    return 0


def _header_vocabulary(md: dict[str, Any]) -> HeaderVocabulary | None:
    tokens = md.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, Sequence) or isinstance(tokens, str):
        return None

    def stated(key: str, kind: type) -> Any:
        value = md.get(key)
        return value if isinstance(value, kind) else None

    return HeaderVocabulary(tokens, stated("tokenizer.ggml.bos_token_id", int),
                            stated("tokenizer.ggml.eos_token_id", int),
                            stated("tokenizer.ggml.add_bos_token", bool))


def spec_from_header(header: GGUFHeader) -> ModelSpec:
    """Build the ModelSpec for a GGUF header; ModelFormatError when keys are missing or absurd."""
    md = header.metadata
    arch = header.architecture
    probe = _Meta(md, arch, 0)
    n_layer = probe.uint("block_count", required=True)
    if not 0 < n_layer <= 512:  # LLAMA_MAX_LAYERS
        raise ModelFormatError(f"{arch}.block_count is {n_layer}", hint="the file is damaged")
    m = _Meta(md, arch, n_layer)
    n_embd = m.uint("embedding_length", required=True)
    n_ctx_train = m.uint("context_length", required=True)
    if n_ctx_train >= 1 << 31:  # llama.cpp's int32 would read it as negative
        raise ModelFormatError(f"{arch}.context_length is {n_ctx_train}", hint="the file is damaged")
    n_layer_nextn = min(m.uint("nextn_predict_layers"), n_layer)
    n_head = m.per_layer("attention.head_count", 0)
    # head_count_kv defaults to head_count (llama-model.cpp: "n_head_kv is optional")
    n_head_kv = m.per_layer("attention.head_count_kv", n_head)
    n_ff = m.per_layer("feed_forward_length", 0)

    n_head0 = n_head[0] if n_head else 0
    if n_head0 > 0:
        default_head = n_embd // n_head0
        k_full = m.uint("attention.key_length", default_head)
        v_full = m.uint("attention.value_length", default_head)
    else:  # recurrent models: no attention heads
        k_full = v_full = 0
    k_swa = m.uint("attention.key_length_swa", k_full)
    v_swa = m.uint("attention.value_length_swa", v_full)

    is_swa, n_swa, chunked = _sliding_window(m, n_layer)
    head_dim_k = tuple(k_swa if s else k_full for s in is_swa)
    head_dim_v = tuple(v_swa if s else v_full for s in is_swa)

    # MLA (deepseek2 and kin, src/models/deepseek2.cpp): new GGUFs store one latent head
    # with key_length = kv_lora_rank + rope dims and mark it by key/value_length_mla;
    # the cache then has K only (llama-kv-cache.cpp: has_v = !is_mla).
    is_mla = bool(m.uint("attention.key_length_mla") and m.uint("attention.value_length_mla"))

    is_recurrent = _recurrent_layers(m, n_layer, n_layer - n_layer_nextn, n_head_kv, n_ff)
    n_embd_r, n_embd_s = _recurrent_state(m, n_embd, n_head0) if any(is_recurrent) else (0, 0)

    has_memory = arch not in NO_MEMORY_ARCHS
    kv_from_start = _kv_from_start(m, arch, n_layer)
    has_kv = []
    for il in range(n_layer):
        owns = has_memory and (kv_from_start < 0 or il < kv_from_start)
        if arch in RECURRENT_ARCHS:
            owns = False
        elif arch in HYBRID_ARCHS and arch != "falcon-h1":
            owns = owns and not is_recurrent[il]
        if n_layer_nextn and il >= n_layer - n_layer_nextn:
            owns = False  # MTP layers: filtered out of the main context's cache
        owns = owns and n_head_kv[il] > 0
        has_kv.append(owns)

    layer_bytes = [0] * n_layer
    input_bytes = output_bytes = 0
    names = {t.name: t for t in header.tensors}
    for layer, t in iter_layer_tensors(header.tensors):
        if layer is not None and layer < n_layer:
            layer_bytes[layer] += t.n_bytes
        elif t.name.startswith("output") or t.name.startswith("cls"):
            output_bytes += t.n_bytes
        else:
            input_bytes += t.n_bytes
    output_is_tied = "output.weight" not in names and "token_embd.weight" in names
    tied_bytes = names["token_embd.weight"].n_bytes if output_is_tied else 0

    file_type = md.get("general.file_type")
    return ModelSpec(
        architecture=arch,
        name=md.get("general.name") if isinstance(md.get("general.name"), str) else None,
        n_layer=n_layer,
        n_layer_nextn=n_layer_nextn,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        is_swa=is_swa,
        n_swa=n_swa,
        swa_chunked=chunked,
        is_mla=is_mla,
        has_kv=tuple(has_kv),
        is_recurrent=is_recurrent if has_memory else (False,) * n_layer,
        n_embd_r=n_embd_r,
        n_embd_s=n_embd_s,
        has_memory=has_memory,
        n_vocab=_vocab_size(md, arch),
        n_ctx_train=n_ctx_train,
        layer_bytes=tuple(layer_bytes),
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        output_is_tied=output_is_tied,
        tied_output_bytes=tied_bytes,
        file_type=file_type if isinstance(file_type, int) else None,
        n_ff_max=max(n_ff, default=0),
        vocabulary=_header_vocabulary(md),
    )


def _kv_from_start(m: _Meta, arch: str, n_layer: int) -> int:
    """hparams.n_layer_kv_from_start: layers past it reuse earlier layers' KV (Gemma 3n/4)."""
    if arch == "gemma3n":
        return 20
    if arch == "gemma4":
        return n_layer - m.uint("attention.shared_kv_layers")
    return -1


def check_loadable(header: GGUFHeader) -> None:
    """What llama.cpp would abort on (GGML_ASSERT) instead of refusing cleanly
    (src/llama-vocab.cpp): no vocabulary at all (tokenizing then hits
    GGML_ASSERT(type != LLAMA_VOCAB_TYPE_NONE)) and duplicate token strings
    (GGML_ASSERT(id_to_token.size() == token_to_id.size())), and a negative or NaN
    norm epsilon (ggml-cpu/ops.cpp GGML_ASSERT(eps >= 0.0f))."""
    md = header.metadata
    for key, value in md.items():
        if key.endswith("epsilon") and (not isinstance(value, (int, float)) or not 0 <= value < float("inf")):
            raise ModelFormatError(f"GGUF metadata {key} = {value!r} is not a small positive number",
                                   hint="the file is damaged")
    model = md.get("tokenizer.ggml.model")
    tokens = md.get("tokenizer.ggml.tokens")
    if model in (None, "none", "no_vocab") or not isinstance(tokens, Sequence) or isinstance(tokens, str) \
            or len(tokens) == 0:
        raise ModelFormatError("the model has no tokenizer vocabulary",
                               hint="kvchat chats with text models; this file cannot tokenize text")
    # llama.cpp reads each token as a C string: text after a NUL byte is lost, so
    # "a\0x" and "a\0y" are the same token to it
    items = tokens.raw_items() if isinstance(tokens, StringArray) else (str(t).encode() for t in tokens)
    if len({item.split(b"\0", 1)[0] for item in items}) != len(tokens):
        raise ModelFormatError("the model's vocabulary lists the same token twice",
                               hint="the file is damaged; download it again")


def read_spec(path: str) -> ModelSpec:
    """Header and spec of a local GGUF model in one call (all parts of a split model)."""
    from kvchat.gguf import read_model_header_file

    return spec_from_header(read_model_header_file(path))
