"""CLIP's text transformer (Radford et al. 2021, sec. 2.4), the encoder SD 1.x conditions its U-Net on.

Our own module, with transformers' parameter names ("text_model.*", the transformers 4 layout) and config.json
keys, so that a folder we write loads in transformers' CLIPTextModel and diffusers, and theirs loads here. Why not
transformers' class itself: importing it takes 3-5 s on a 2-core CPU (it pulls in torch.distributed.tensor and
torch._dynamo), longer than the embedded pipeline takes to load and make an image. transformers stays the oracle
of the tests (tests/test_text.py).

The network: token + position embeddings, then pre-LayerNorm residual blocks (causal multi-head self-attention,
an MLP with quick-GELU), then a final LayerNorm. The pooled output is the state at each sequence's first
end-of-text token (SD does not use it; CLIP projects it for the contrastive loss).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation, x * sigmoid(1.702 x): the models were trained with it."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # named functions: the model pickles


@dataclasses.dataclass
class CLIPTextConfig:
    """transformers' CLIPTextConfig keys and defaults, for the keys the text transformer uses."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512  # unused by the text model; kept so that configs round-trip
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIPTextConfig: hidden_act {self.hidden_act!r} is not supported (choose from "
                             f"{sorted(ACTIVATIONS)})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIPTextConfig: hidden_size {self.hidden_size} must be a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")

    @classmethod
    def keys(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "text encoder config") -> "CLIPTextConfig":
        """From a config.json written by transformers (any version) or by us."""
        if data.get("model_type", "clip_text_model") != "clip_text_model":
            raise ValueError(f"{source}: model_type {data.get('model_type')!r}; the text encoder must be a "
                             "CLIPTextModel ('clip_text_model')")
        # other keys are transformers' generic ones (architectures, dtype, id2label, ...): nothing to build
        return cls(**{k: v for k, v in data.items() if k in cls.keys()})

    def to_dict(self) -> dict[str, Any]:
        """config.json as transformers' CLIPTextModel.from_pretrained reads it."""
        return {**dataclasses.asdict(self), "model_type": "clip_text_model", "architectures": ["CLIPTextModel"]}


@dataclasses.dataclass
class TextModelOutput:
    """What CLIPTextModel returns; like transformers' output, it also indexes as the tuple of its set fields
    (diffusers' encode_prompt reads `output[0]` and `output[-1]`)."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None

    def to_tuple(self) -> tuple:
        return tuple(v for v in (self.last_hidden_state, self.pooler_output, self.hidden_states) if v is not None)

    def __getitem__(self, index: int):
        return self.to_tuple()[index]


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        width, self.heads, self.dropout = config.hidden_size, config.num_attention_heads, config.attention_dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (proj(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # [B, heads, L, head_dim]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).flatten(2))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        # given weights, nn.Embedding skips its own N(0, 1) draw (CLIPTextModel draws them); on the meta device that
        # draw would import torch._dynamo, 1.7 s, into every pipeline load
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size,
                                            _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size,
                                               _weight=torch.empty(config.max_position_embeddings, config.hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """Token ids [B, L] (L <= max_position_embeddings) -> `last_hidden_state` [B, L, hidden_size] (after the final
    LayerNorm), `pooler_output` [B, hidden_size] and, with output_hidden_states, `hidden_states` (the embeddings,
    then each layer's output, before the final LayerNorm), as transformers' CLIPTextModel returns them.
    `attention_mask` [B, L] (1: attend, 0: padding) is applied on top of the causal mask."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        self.gradient_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """transformers' initialisation for CLIP: embeddings N(0, 0.02^2); attention and MLP weights N(0, s^2) with
        s scaled by width and depth (GPT-2 style); biases 0; LayerNorms 1 and 0. Everything times
        initializer_factor."""
        if self.text_model.final_layer_norm.weight.is_meta:  # built to be loaded: nothing to draw
            return
        c, factor = self.config, self.config.initializer_factor
        deep = (c.hidden_size ** -0.5) * ((2 * c.num_hidden_layers) ** -0.5) * factor  # into the residual stream
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight), nn.init.zeros_(module.bias)
        embeddings = self.text_model.embeddings
        for table in (embeddings.token_embedding, embeddings.position_embedding):
            table.weight.normal_(0.0, 0.02 * factor)
        for layer in self.text_model.encoder.layers:
            attention, mlp = layer.self_attn, layer.mlp
            for proj in (attention.q_proj, attention.k_proj, attention.v_proj, mlp.fc2):
                proj.weight.normal_(0.0, deep)
            attention.out_proj.weight.normal_(0.0, c.hidden_size ** -0.5 * factor)
            mlp.fc1.weight.normal_(0.0, (2 * c.hidden_size) ** -0.5 * factor)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.final_layer_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text_model.final_layer_norm.weight.device

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.embeddings.token_embedding

    @torch.no_grad()
    def resize_token_embeddings(self, new_num_tokens: int) -> nn.Embedding:
        """A token table of `new_num_tokens` rows (textual inversion's added tokens): the first rows kept, new ones
        drawn as CLIP initialises them (for the caller to set); config.vocab_size follows."""
        old = self.get_input_embeddings()
        table = nn.Embedding(new_num_tokens, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
        table.weight.normal_(0.0, 0.02 * self.config.initializer_factor)
        kept = min(new_num_tokens, old.num_embeddings)
        table.weight[:kept] = old.weight[:kept]
        table.weight.requires_grad_(old.weight.requires_grad)
        self.text_model.embeddings.token_embedding = table
        self.config.vocab_size = new_num_tokens
        return table

    def gradient_checkpointing_enable(self) -> None:
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> TextModelOutput:
        core, length = self.text_model, input_ids.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(f"input_ids have {length} tokens; this text encoder has "
                             f"{self.config.max_position_embeddings} positions")
        x = core.embeddings(input_ids)
        mask = None
        if attention_mask is not None:  # [B, 1, L, L]: causal and not padding
            causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
            mask = causal & attention_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]
        hidden = [x]
        for layer in core.encoder.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
            hidden.append(x)
        last = core.final_layer_norm(x)
        if self.config.eos_token_id == 2:  # older CLIP configs (the hub's SD 1.x folders): end-of-text is the top id
            first_eos = input_ids.int().argmax(dim=-1)
        else:
            first_eos = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)
        pooled = last[torch.arange(last.shape[0], device=last.device), first_eos.to(last.device)]
        return TextModelOutput(last, pooled, tuple(hidden) if output_hidden_states else None)
