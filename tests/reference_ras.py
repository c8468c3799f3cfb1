"""Independent, hand-written RAS reference for diffusers SD3 / SD3.5 and Flux transformers.

This module is a *test oracle*: it re-implements region-adaptive sampling (RAS) "the hand-patching
way", like the official RAS code does, without torch.fx / torch.export and without any code from
``rasfx``.  It is written against diffusers 0.42.1 (``SD3Transformer2DModel``,
``JointTransformerBlock``, ``JointAttnProcessor2_0``, ``FluxTransformer2DModel``,
``FluxTransformerBlock``, ``FluxSingleTransformerBlock``, ``FluxAttnProcessor``).

Contract (shared with the compiler)
-----------------------------------
``ref = HandRAS(model)``; ``out = ref(active, **model_kwargs)``.

* ``active is None``: dense forward, bit-identical to ``model(**kwargs, return_dict=False)[0]``;
  (re)fills every cache.
* ``active`` = LongTensor ``[n]`` (shared by all batch rows) or ``[B, n]`` (row ``b`` uses
  ``active[b]``): indices of the image tokens computed by this forward.  Image token ``i`` is the
  ``i``-th image token in the model's own sequence order (SD3: row-major over the patch grid after
  the patch embedding; Flux: index along the packed ``hidden_states`` sequence dim).
* Active image tokens are gathered right after the patch+positional embedding (SD3) / after
  ``x_embedder`` (Flux; the image rows of the RoPE table built from ``cat(txt_ids, img_ids)`` are
  gathered the same way).  All text tokens are always computed.
* Every attention site (``transformer_blocks.i.attn``, SD3.5 ``transformer_blocks.i.attn2``, Flux
  ``single_transformer_blocks.j.attn``) owns an image K/V cache holding K/V exactly as they enter
  scaled-dot-product attention (after q/k RMSNorm, after RoPE for Flux).  On a partial forward the
  active rows are overwritten with fresh values, then attention runs with the active queries
  (+ all text queries) against ``[fresh text K/V + full image cache]`` in the model's own
  concatenation order (SD3 joint attention: image then text; Flux: text then image).
* The per-token output before unpatchify (SD3: after ``norm_out`` + ``proj_out``, ``[B, N, p*p*C]``;
  Flux: the model output ``[B, N, C]``) is scattered into an output cache; SD3 then unpatchifies the
  whole cache exactly as the model does.
* Caches are per batch row (batch dim first), per ``HandRAS`` instance; ``reset()`` drops them.

The model is never modified permanently: the custom processors are swapped into the attention
modules for the duration of one call and the original processor objects are put back afterwards
(weights are shared, nothing is copied).

Also provided: ``SDPASubstitutionOracle``, a second, structurally different oracle that runs the
*unmodified* model densely and only intercepts ``torch.nn.functional.scaled_dot_product_attention``
to substitute cached K/V rows of inactive image tokens (see its docstring for why this is exactly
equivalent), plus tiny model / input builders for tests.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

__all__ = [
    "HandRAS",
    "SDPASubstitutionOracle",
    "make_sd3_tiny",
    "make_flux_tiny",
    "sd3_inputs",
    "flux_inputs",
    "num_image_tokens",
    "token_grid",
    "normalize_active",
    "active_mask",
    "sd3_patchify",
    "sd3_unpatchify",
]


# ----------------------------------------------------------------------------------------------
# index helpers (plain torch, no model knowledge)
# ----------------------------------------------------------------------------------------------
def normalize_active(active: torch.Tensor, batch: int, n_tokens: int) -> torch.Tensor:
    """Validate ``active`` ([n] or [B, n]) and return per-row indices ``[B, n]`` (int64)."""
    if not isinstance(active, torch.Tensor):
        active = torch.as_tensor(active)
    if active.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"active indices must be an integer tensor, got {active.dtype}")
    active = active.long()
    if active.ndim == 1:
        active = active.unsqueeze(0).expand(batch, -1)
    elif active.ndim == 2:
        if active.shape[0] != batch:
            raise ValueError(f"per-row active indices have {active.shape[0]} rows, batch is {batch}")
    else:
        raise ValueError(f"active must be [n] or [B, n], got shape {tuple(active.shape)}")
    if active.shape[1] == 0:
        raise ValueError("active must select at least one image token")
    if int(active.min()) < 0 or int(active.max()) >= n_tokens:
        raise IndexError(f"active indices out of range [0, {n_tokens})")
    srt = active.sort(dim=1).values
    if bool((srt[:, 1:] == srt[:, :-1]).any()):
        raise ValueError("active indices must be unique within a row")
    return active


def active_mask(active: torch.Tensor | None, batch: int, n_tokens: int) -> torch.Tensor:
    """Boolean ``[B, N]`` mask of active image tokens (all True for ``active=None``)."""
    if active is None:
        return torch.ones(batch, n_tokens, dtype=torch.bool)
    idx = normalize_active(active, batch, n_tokens)
    mask = torch.zeros(batch, n_tokens, dtype=torch.bool, device=idx.device)
    mask.scatter_(1, idx, True)
    return mask


def _index_like(idx_rows: torch.Tensor, like_shape, dim: int) -> torch.Tensor:
    """Broadcast per-row indices ``[B, n]`` to ``like_shape`` (which has n at ``dim``)."""
    view = [1] * len(like_shape)
    view[0] = idx_rows.shape[0]
    view[dim] = idx_rows.shape[1]
    return idx_rows.view(view).expand(*like_shape)


def _gather_rows(x: torch.Tensor, idx_rows: torch.Tensor, dim: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = idx_rows.shape[1]
    return x.gather(dim, _index_like(idx_rows.to(x.device), shape, dim))


def _scatter_rows(cache: torch.Tensor, fresh: torch.Tensor, idx_rows: torch.Tensor, dim: int) -> torch.Tensor:
    """Out-of-place: a copy of ``cache`` whose rows ``idx_rows`` (along ``dim``, per batch row) are ``fresh``."""
    if cache.shape[0] != fresh.shape[0] or cache.dim() != fresh.dim():
        raise RuntimeError(f"cache shape {tuple(cache.shape)} incompatible with fresh {tuple(fresh.shape)}")
    return cache.scatter(dim, _index_like(idx_rows.to(cache.device), fresh.shape, dim), fresh.to(cache.dtype))


def _apply_rope_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Per-batch-row variant of diffusers' ``apply_rotary_emb(use_real=True, unbind_dim=-1, sequence_dim=1)``.

    ``x``: [B, S, H, D]; ``cos``/``sin``: [B, S, D].  Same element-wise arithmetic as diffusers.
    """
    cos = cos[:, :, None, :].to(x.device)
    sin = sin[:, :, None, :].to(x.device)
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# shared per-call state
# ----------------------------------------------------------------------------------------------
@dataclass
class _CallState:
    partial: bool = False
    idx: torch.Tensor | None = None  # [B, n] per-row indices (partial only)
    shared: bool = True  # indices given as [n]
    n_image: int = 0  # N, full number of image tokens
    text_len: int = 0  # T (needed by Flux single blocks, where text+image come in one tensor)
    call_order: list = field(default_factory=list)


class _CacheSite:
    """Base for the cache-holding processors: one per attention module, one per HandRAS."""

    # layout of the cached image K/V as they enter SDPA; "BHND" (SD3) or "BNHD" (Flux)
    layout = "BHND"

    def __init__(self, state: _CallState, site: str):
        self.state = state
        self.site = site
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    @property
    def _tok_dim(self) -> int:
        return 2 if self.layout == "BHND" else 1

    def _update(self, k_img: torch.Tensor, v_img: torch.Tensor):
        """Store fresh image K/V (dense) or scatter active rows into the cache (partial).

        Returns the full-length image K/V to attend to.
        """
        st = self.state
        st.call_order.append(self.site)
        if st.partial:
            if self.k_cache is None:
                raise RuntimeError(f"{self.site}: partial forward before any dense forward (empty cache)")
            if self.k_cache.shape[self._tok_dim] != st.n_image or self.k_cache.shape[0] != k_img.shape[0]:
                raise RuntimeError(
                    f"{self.site}: cache shape {tuple(self.k_cache.shape)} does not match batch "
                    f"{k_img.shape[0]} / {st.n_image} image tokens; run a dense forward first"
                )
            k_img = _scatter_rows(self.k_cache, k_img, st.idx, self._tok_dim)
            v_img = _scatter_rows(self.v_cache, v_img, st.idx, self._tok_dim)
        # out-of-place scatter => storing references is safe
        self.k_cache, self.v_cache = k_img, v_img
        return k_img, v_img

    def reset(self):
        self.k_cache = self.v_cache = None


# ----------------------------------------------------------------------------------------------
# SD3 / SD3.5: mirror of diffusers.models.attention_processor.JointAttnProcessor2_0
# (used for JointTransformerBlock.attn (joint, encoder_hidden_states given) and for the SD3.5
#  dual-attention attn2 (image-only self attention, encoder_hidden_states=None))
# ----------------------------------------------------------------------------------------------
class RASJointAttnProcessor(_CacheSite):
    layout = "BHND"

    def __call__(
        self,
        attn,
        hidden_states: torch.FloatTensor,
        encoder_hidden_states: torch.FloatTensor = None,
        attention_mask: torch.FloatTensor | None = None,
        *args,
        **kwargs,
    ) -> torch.FloatTensor:
        residual = hidden_states

        batch_size = hidden_states.shape[0]

        # `sample` projections (active image tokens only on a partial forward).
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # RAS: image K/V cache [B, H, N, D], exactly what enters SDPA.
        key, value = self._update(key, value)

        # `context` projections.
        if encoder_hidden_states is not None:
            encoder_hidden_states_query_proj = attn.add_q_proj(encoder_hidden_states)
            encoder_hidden_states_key_proj = attn.add_k_proj(encoder_hidden_states)
            encoder_hidden_states_value_proj = attn.add_v_proj(encoder_hidden_states)

            encoder_hidden_states_query_proj = encoder_hidden_states_query_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)
            encoder_hidden_states_key_proj = encoder_hidden_states_key_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)
            encoder_hidden_states_value_proj = encoder_hidden_states_value_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)

            if attn.norm_added_q is not None:
                encoder_hidden_states_query_proj = attn.norm_added_q(encoder_hidden_states_query_proj)
            if attn.norm_added_k is not None:
                encoder_hidden_states_key_proj = attn.norm_added_k(encoder_hidden_states_key_proj)

            # SD3 order: image first, then text.
            query = torch.cat([query, encoder_hidden_states_query_proj], dim=2)
            key = torch.cat([key, encoder_hidden_states_key_proj], dim=2)
            value = torch.cat([value, encoder_hidden_states_value_proj], dim=2)

        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            # Split the attention outputs (queries: active image rows, then text rows).
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        else:
            return hidden_states


# ----------------------------------------------------------------------------------------------
# Flux: mirror of diffusers.models.transformers.transformer_flux.FluxAttnProcessor
# (double-stream blocks: encoder_hidden_states given; single-stream blocks: text and image arrive
#  concatenated in hidden_states, the text length comes from the call state)
# ----------------------------------------------------------------------------------------------
class RASFluxAttnProcessor(_CacheSite):
    layout = "BNHD"
    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise NotImplementedError("HandRAS: attention_mask is not supported for Flux")
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )

        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))

            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)

            # Flux order: text first, then image.
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb
            if cos.ndim == 2:  # [S, D] shared by all rows (dense, or shared active indices)
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
            else:  # [B, S, D] per-row gathered table
                query = _apply_rope_rows(query, cos, sin)
                key = _apply_rope_rows(key, cos, sin)

        # RAS: split text / image K/V (post-norm, post-RoPE), update the image cache [B, N, H, D].
        text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else self.state.text_len
        k_img, v_img = self._update(key[:, text_len:], value[:, text_len:])
        if self.state.partial:
            key = torch.cat([key[:, :text_len], k_img], dim=1)
            value = torch.cat([value[:, :text_len], v_img], dim=1)
        # (dense: key/value are already [fresh text, fresh image]; leave them untouched)

        hidden_states = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())

            return hidden_states, encoder_hidden_states
        else:
            return hidden_states


# ----------------------------------------------------------------------------------------------
# the wrapper
# ----------------------------------------------------------------------------------------------
class HandRAS:
    """Hand-patched RAS reference for ``SD3Transformer2DModel`` / ``FluxTransformer2DModel``.

    ``ref(active=None | LongTensor[n] | LongTensor[B, n], **model_kwargs) -> Tensor`` (the model's
    output tensor; ``return_dict`` is ignored).  See the module docstring for the contract.

    Inspection API (for tests):
      * ``ref.kind``: ``"sd3"`` or ``"flux"``
      * ``ref.sites``: attention-site names (module qualified names) in module order
      * ``ref.site_call_order``: site names in the order the last forward called them
      * ``ref.kv_cache(site)``: ``(K, V)`` image cache, canonical layout ``[B, N, H, D]`` (copies)
      * ``ref.kv_cache_raw(site)``: ``(K, V)`` in the processor's own layout (SD3 ``[B,H,N,D]``,
        Flux ``[B,N,H,D]``), not copied
      * ``ref.out_cache``: per-token output cache (SD3 ``[B, N, p*p*C]``, Flux ``[B, N, C]``)
      * ``ref.n_image``: N of the cached sequence (None before the first dense call)
      * ``ref.reset()``: drop every cache
    """

    def __init__(self, model: torch.nn.Module):
        if isinstance(model, SD3Transformer2DModel):
            self.kind = "sd3"
            proc_cls = RASJointAttnProcessor
            names = []
            for i, blk in enumerate(model.transformer_blocks):
                names.append(f"transformer_blocks.{i}.attn")
                if getattr(blk, "attn2", None) is not None:
                    names.append(f"transformer_blocks.{i}.attn2")
        elif isinstance(model, FluxTransformer2DModel):
            self.kind = "flux"
            proc_cls = RASFluxAttnProcessor
            names = [f"transformer_blocks.{i}.attn" for i in range(len(model.transformer_blocks))]
            names += [f"single_transformer_blocks.{i}.attn" for i in range(len(model.single_transformer_blocks))]
        else:
            raise TypeError(f"HandRAS supports SD3Transformer2DModel and FluxTransformer2DModel, got {type(model)}")
        self.model = model
        self._state = _CallState()
        self.sites = names
        self._modules = {n: model.get_submodule(n) for n in names}
        for n, m in self._modules.items():
            if getattr(m, "fused_projections", False) or getattr(m, "to_qkv", None) is not None:
                raise NotImplementedError(f"{n}: fused QKV projections are not supported by the reference")
            if isinstance(m.processor, torch.nn.Module):
                raise NotImplementedError(f"{n}: nn.Module processors (e.g. IP-adapter) are not supported")
        self._procs = {n: proc_cls(self._state, n) for n in names}
        self.out_cache: torch.Tensor | None = None
        self.n_image: int | None = None

    # -- cache API ----------------------------------------------------------------------------
    def reset(self):
        for p in self._procs.values():
            p.reset()
        self.out_cache = None
        self.n_image = None

    def kv_cache_raw(self, site: str):
        p = self._procs[site]
        return p.k_cache, p.v_cache

    def kv_cache(self, site: str):
        p = self._procs[site]
        if p.k_cache is None:
            return None, None
        k, v = p.k_cache, p.v_cache
        if p.layout == "BHND":
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        return k.clone(memory_format=torch.contiguous_format), v.clone(memory_format=torch.contiguous_format)

    @property
    def site_call_order(self):
        return list(self._state.call_order)

    # -- patching -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _patched(self):
        saved = {n: m.processor for n, m in self._modules.items()}
        try:
            for n, m in self._modules.items():
                # plain attribute swap (our processors are not nn.Modules); restored below
                m.processor = self._procs[n]
            yield
        finally:
            for n, m in self._modules.items():
                m.processor = saved[n]

    def _begin(self, active, batch: int, n_image: int, text_len: int):
        st = self._state
        st.call_order = []
        st.text_len = text_len
        st.n_image = n_image
        if active is None:
            st.partial, st.idx, st.shared = False, None, True
        else:
            if self.out_cache is None:
                raise RuntimeError("HandRAS: partial forward before any dense forward (call with active=None first)")
            if self.n_image != n_image or self.out_cache.shape[0] != batch:
                raise RuntimeError(
                    f"HandRAS: cached state is for batch {self.out_cache.shape[0]} / {self.n_image} image tokens, "
                    f"got batch {batch} / {n_image}; run a dense forward first"
                )
            st.partial = True
            st.shared = torch.as_tensor(active).ndim == 1
            st.idx = normalize_active(active, batch, n_image)

    def _update_out(self, tokens: torch.Tensor) -> torch.Tensor:
        st = self._state
        if st.partial:
            tokens = _scatter_rows(self.out_cache, tokens, st.idx, 1)
        self.out_cache = tokens
        self.n_image = st.n_image
        return tokens

    # -- forward ------------------------------------------------------------------------------
    def __call__(self, active: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        kwargs = dict(kwargs)
        kwargs.pop("return_dict", None)
        with self._patched():
            if self.kind == "sd3":
                return self._forward_sd3(active, **kwargs)
            return self._forward_flux(active, **kwargs)

    forward = __call__

    # copied from SD3Transformer2DModel.forward (diffusers 0.42.1), with RAS gather / scatter
    def _forward_sd3(
        self,
        active,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        pooled_projections: torch.Tensor = None,
        timestep: torch.LongTensor = None,
        block_controlnet_hidden_states: list = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        skip_layers: list[int] | None = None,
    ) -> torch.Tensor:
        m = self.model
        if block_controlnet_hidden_states is not None:
            raise NotImplementedError("HandRAS: controlnet residuals are not supported")
        if joint_attention_kwargs is not None and "ip_adapter_image_embeds" in joint_attention_kwargs:
            raise NotImplementedError("HandRAS: IP-adapter is not supported")

        height, width = hidden_states.shape[-2:]

        hidden_states = m.pos_embed(hidden_states)  # takes care of adding positional embeddings too.
        hidden_states = hidden_states.contiguous()
        temb = m.time_text_embed(timestep, pooled_projections)
        encoder_hidden_states = m.context_embedder(encoder_hidden_states)

        # RAS: keep only the active image tokens
        self._begin(active, hidden_states.shape[0], hidden_states.shape[1], encoder_hidden_states.shape[1])
        if self._state.partial:
            hidden_states = _gather_rows(hidden_states, self._state.idx, 1)

        for index_block, block in enumerate(m.transformer_blocks):
            is_skip = True if skip_layers is not None and index_block in skip_layers else False
            if not is_skip:
                encoder_hidden_states, hidden_states = block(
                    hidden_states=hidden_states,
                    encoder_hidden_states=encoder_hidden_states,
                    temb=temb,
                    joint_attention_kwargs=joint_attention_kwargs,
                )

        hidden_states = m.norm_out(hidden_states, temb)
        hidden_states = m.proj_out(hidden_states)

        # RAS: per-token output cache [B, N, p*p*C]
        hidden_states = self._update_out(hidden_states)

        # unpatchify
        patch_size = m.config.patch_size
        height = height // patch_size
        width = width // patch_size

        hidden_states = hidden_states.reshape(
            shape=(hidden_states.shape[0], height, width, patch_size, patch_size, m.out_channels)
        )
        hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
        output = hidden_states.reshape(
            shape=(hidden_states.shape[0], m.out_channels, height * patch_size, width * patch_size)
        )
        if output.untyped_storage().data_ptr() == self.out_cache.untyped_storage().data_ptr():
            output = output.clone()  # never hand out a view of the cache (degenerate grids)
        return output

    # copied from FluxTransformer2DModel.forward (diffusers 0.42.1), with RAS gather / scatter
    def _forward_flux(
        self,
        active,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        pooled_projections: torch.Tensor = None,
        timestep: torch.LongTensor = None,
        img_ids: torch.Tensor = None,
        txt_ids: torch.Tensor = None,
        guidance: torch.Tensor = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        controlnet_block_samples=None,
        controlnet_single_block_samples=None,
        controlnet_blocks_repeat: bool = False,
    ) -> torch.Tensor:
        m = self.model
        if controlnet_block_samples is not None or controlnet_single_block_samples is not None:
            raise NotImplementedError("HandRAS: controlnet residuals are not supported")
        if joint_attention_kwargs is not None and "ip_adapter_image_embeds" in joint_attention_kwargs:
            raise NotImplementedError("HandRAS: IP-adapter is not supported")

        hidden_states = m.x_embedder(hidden_states)

        timestep = timestep.to(hidden_states.dtype) * 1000
        if guidance is not None:
            guidance = guidance.to(hidden_states.dtype) * 1000

        temb = (
            m.time_text_embed(timestep, pooled_projections)
            if guidance is None
            else m.time_text_embed(timestep, guidance, pooled_projections)
        )
        encoder_hidden_states = m.context_embedder(encoder_hidden_states)

        if txt_ids.ndim == 3:
            txt_ids = txt_ids[0]
        if img_ids.ndim == 3:
            img_ids = img_ids[0]

        ids = torch.cat((txt_ids, img_ids), dim=0)
        image_rotary_emb = m.pos_embed(ids)

        # RAS: keep only the active image tokens, and their RoPE rows
        text_len = encoder_hidden_states.shape[1]
        self._begin(active, hidden_states.shape[0], hidden_states.shape[1], text_len)
        st = self._state
        if st.partial:
            hidden_states = _gather_rows(hidden_states, st.idx, 1)
            cos, sin = image_rotary_emb
            if st.shared:
                sel = st.idx[0].to(cos.device)
                image_rotary_emb = tuple(torch.cat([t[:text_len], t[text_len:][sel]], dim=0) for t in (cos, sin))
            else:
                idx = st.idx.to(cos.device)
                image_rotary_emb = tuple(
                    torch.cat([t[:text_len].unsqueeze(0).expand(idx.shape[0], -1, -1), t[text_len:][idx]], dim=1)
                    for t in (cos, sin)
                )  # [B, T+n, D]

        for block in m.transformer_blocks:
            encoder_hidden_states, hidden_states = block(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                temb=temb,
                image_rotary_emb=image_rotary_emb,
                joint_attention_kwargs=joint_attention_kwargs,
            )

        for block in m.single_transformer_blocks:
            encoder_hidden_states, hidden_states = block(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                temb=temb,
                image_rotary_emb=image_rotary_emb,
                joint_attention_kwargs=joint_attention_kwargs,
            )

        hidden_states = m.norm_out(hidden_states, temb)
        output = m.proj_out(hidden_states)

        # RAS: per-token output cache [B, N, C]
        output = self._update_out(output)
        return output.clone()


# ----------------------------------------------------------------------------------------------
# second oracle: dense model run + SDPA K/V substitution
# ----------------------------------------------------------------------------------------------
class SDPASubstitutionOracle:
    """RAS oracle that shares no code with ``HandRAS``'s processors.

    It runs the *unmodified* model densely (all queries), and wraps
    ``torch.nn.functional.scaled_dot_product_attention`` so that, at every attention call, the
    image-token rows of K and V at *inactive* positions are replaced by the cached rows (the
    cache is then updated with what was used).  Why this equals RAS at the active tokens: an
    active image token's hidden state only depends on its own residual stream, on ``temb`` and,
    through attention, on the K/V of all tokens; the text tokens likewise.  The only quantities
    through which inactive tokens influence anything are their K/V, which are substituted by the
    cached ones.  So active and text rows are exactly the RAS values (up to SDPA round-off from the
    different query count), and the inactive rows' (garbage) values are discarded: the output at
    inactive tokens is taken from the output cache.

    Image rows inside the SDPA inputs ([B, H, S, D]): SD3 -> rows [0, N) (joint: S = N + T;
    SD3.5 attn2: S = N); Flux -> rows [T, T + N) (S = T + N).  Attention sites are identified by
    call order.  Caches: ``self.kv[i] = (K, V)`` as [B, H, N, D]; ``self.out`` is the model output.
    """

    def __init__(self, model: torch.nn.Module):
        if isinstance(model, SD3Transformer2DModel):
            self.kind = "sd3"
        elif isinstance(model, FluxTransformer2DModel):
            self.kind = "flux"
        else:
            raise TypeError(type(model))
        self.model = model
        self.kv: list = []
        self.out: torch.Tensor | None = None

    def reset(self):
        self.kv, self.out = [], None

    def __call__(self, active=None, **kwargs) -> torch.Tensor:
        kwargs = dict(kwargs)
        kwargs["return_dict"] = False
        B = kwargs["hidden_states"].shape[0]
        if self.kind == "sd3":
            p = self.model.config.patch_size
            H, W = kwargs["hidden_states"].shape[-2:]
            N = (H // p) * (W // p)
            T = kwargs["encoder_hidden_states"].shape[1]
        else:
            N = kwargs["hidden_states"].shape[1]
            T = kwargs["encoder_hidden_states"].shape[1]
        if active is not None and self.out is None:
            raise RuntimeError("oracle: partial call before a dense call")
        mask = active_mask(active, B, N).to(kwargs["hidden_states"].device)  # [B, N]
        counter = [0]
        orig_sdpa = torch.nn.functional.scaled_dot_product_attention
        dense = active is None

        def sdpa(*args, **kw):
            names = ["query", "key", "value"]
            args = list(args)
            qkv = {}
            for nm in names:
                qkv[nm] = args.pop(0) if args else kw.pop(nm)
            q, k, v = qkv["query"], qkv["key"], qkv["value"]
            i = counter[0]
            counter[0] += 1
            S = k.shape[2]
            if self.kind == "sd3":
                lo = 0
                assert S in (N, N + T), (S, N, T)
            else:
                lo = T
                assert S == N + T, (S, N, T)
            k_img, v_img = k[:, :, lo : lo + N], v[:, :, lo : lo + N]
            if dense:
                if i == len(self.kv):
                    self.kv.append(None)
                self.kv[i] = (k_img.clone(), v_img.clone())
            else:
                ck, cv = self.kv[i]
                mk = mask[:, None, :, None]
                k_img = torch.where(mk, k_img, ck)
                v_img = torch.where(mk, v_img, cv)
                self.kv[i] = (k_img.clone(), v_img.clone())
                k = torch.cat([k[:, :, :lo], k_img, k[:, :, lo + N :]], dim=2)
                v = torch.cat([v[:, :, :lo], v_img, v[:, :, lo + N :]], dim=2)
            return orig_sdpa(q, k, v, *args, **kw)

        torch.nn.functional.scaled_dot_product_attention = sdpa
        try:
            out = self.model(**kwargs)[0]
        finally:
            torch.nn.functional.scaled_dot_product_attention = orig_sdpa
        if not dense:
            if counter[0] != len(self.kv):
                raise RuntimeError("oracle: number of attention calls changed between forwards")
            if self.kind == "sd3":
                p = self.model.config.patch_size
                h, w = out.shape[-2] // p, out.shape[-1] // p
                mpx = mask.view(B, 1, h, 1, w, 1).expand(B, 1, h, p, w, p).reshape(B, 1, h * p, w * p)
            else:
                mpx = mask[:, :, None]
            out = torch.where(mpx, out, self.out)
        self.out = out.clone()
        return out


# ----------------------------------------------------------------------------------------------
# token helpers
# ----------------------------------------------------------------------------------------------
def token_grid(model, kwargs) -> tuple[int, int]:
    """(rows, cols) of the image-token grid for these model kwargs (Flux: from img_ids)."""
    if isinstance(model, SD3Transformer2DModel):
        p = model.config.patch_size
        H, W = kwargs["hidden_states"].shape[-2:]
        return H // p, W // p
    ids = kwargs["img_ids"]
    ids = ids[0] if ids.ndim == 3 else ids
    return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1


def num_image_tokens(model, kwargs) -> int:
    if isinstance(model, SD3Transformer2DModel):
        h, w = token_grid(model, kwargs)
        return h * w
    return kwargs["hidden_states"].shape[1]


def sd3_patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Inverse of SD3's unpatchify: [B, C, H, W] -> [B, (H/p)*(W/p), p*p*C] (token order row-major)."""
    B, C, H, W = x.shape
    p = patch_size
    x = x.reshape(B, C, H // p, p, W // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def sd3_unpatchify(tokens: torch.Tensor, height: int, width: int, patch_size: int, out_channels: int):
    """SD3's unpatchify (copied from the model): tokens [B, N, p*p*C] -> [B, C, H, W] (H, W in pixels)."""
    p = patch_size
    h, w = height // p, width // p
    x = tokens.reshape(shape=(tokens.shape[0], h, w, p, p, out_channels))
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(shape=(x.shape[0], out_channels, h * p, w * p))


# ----------------------------------------------------------------------------------------------
# tiny models and inputs for tests
# ----------------------------------------------------------------------------------------------
def _randomize_(model: torch.nn.Module, seed: int, scale: float = 0.2):
    """diffusers zero-inits some layers (e.g. adaLN / norm weights); re-randomize every parameter so
    that every path contributes."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or "norm_added" in name:
                prm.copy_(1.0 + 0.1 * torch.randn(prm.shape, generator=g))
            else:
                prm.copy_(scale * torch.randn(prm.shape, generator=g))
    return model


def make_sd3_tiny(seed: int = 0, dual: bool = True, qk_norm: str | None = "rms_norm", num_layers: int = 2):
    """Tiny random SD3 (dual=False, qk_norm=None) / SD3.5-style (dual attn2 in layer 0, RMS qk-norm) model, eval, fp32."""
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
        pos_embed_max_size=32,
        dual_attention_layers=(0,) if dual else (),
        qk_norm=qk_norm,
    )
    return _randomize_(model, seed).eval()


def make_flux_tiny(seed: int = 0, guidance_embeds: bool = False, num_layers: int = 1, num_single_layers: int = 2):
    """Tiny random Flux model (in_channels=16 packed, joint_attention_dim=16, pooled 8), eval, fp32."""
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )
    return _randomize_(model, seed).eval()


def sd3_inputs(B: int = 2, H: int = 8, W: int = 12, seed: int = 0, text_len: int = 5) -> dict:
    """kwargs for ``make_sd3_tiny`` models: latents [B,4,H,W] (H, W even), text [B,T,16], pooled [B,8], t [B]."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(B, 4, H, W, generator=g),
        encoder_hidden_states=torch.randn(B, text_len, 16, generator=g),
        pooled_projections=torch.randn(B, 8, generator=g),
        timestep=torch.rand(B, generator=g) * 1000.0,
    )


def flux_inputs(
    B: int = 2, h: int = 4, w: int = 6, seed: int = 0, text_len: int = 6, guidance: float | None = None
) -> dict:
    """kwargs for ``make_flux_tiny`` models, built like FluxPipeline does.

    ``h``, ``w``: packed token grid (latent H/2, W/2); N = h*w.  hidden_states [B, N, 16],
    encoder_hidden_states [B, T, 16], pooled [B, 8], timestep [B] in (0, 1) (= t/1000),
    img_ids [N, 3] = (0, row, col), txt_ids zeros [T, 3], guidance [B] if ``guidance`` is given
    (needed for ``make_flux_tiny(guidance_embeds=True)``).
    """
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = img_ids[..., 1] + torch.arange(h)[:, None]
    img_ids[..., 2] = img_ids[..., 2] + torch.arange(w)[None, :]
    kw = dict(
        hidden_states=torch.randn(B, h * w, 16, generator=g),
        encoder_hidden_states=torch.randn(B, text_len, 16, generator=g),
        pooled_projections=torch.randn(B, 8, generator=g),
        timestep=torch.rand(B, generator=g),
        img_ids=img_ids.reshape(h * w, 3),
        txt_ids=torch.zeros(text_len, 3),
    )
    if guidance is not None:
        kw["guidance"] = torch.full([1], float(guidance)).expand(B)
    return kw
