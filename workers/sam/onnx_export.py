"""Export a loaded SAM-family model to ONNX: the image encoder and a prompt decoder, cached on disk.

The decoder graph (:class:`PromptDecoder`) takes the slice's image embedding and every prompt of a
batch as tokens — coordinates in the model frame and labels (1 positive point, 0 negative point,
2/3 box corners, -1 padding: segment_anything's own convention, as in its ``utils/onnx.py``) — and
returns the low-resolution logits of the single-mask output (``multimask_output=False``). Compared
with ``MaskDecoder.forward`` it does the prompt-independent work once per call instead of once per
prompt: the dense "no mask" embedding is added to the image embedding before it is broadcast to the
batch (``expand``, not a copy), the positional encoding is a constant, and only the first mask
token's hypernetwork runs (the IoU head and the three multimask outputs are not computed).

Exports are keyed by model name, weights id (the checkpoint's sha256 prefix) and
:data:`EXPORTER_VERSION`, written into a temporary folder and renamed into place under a file lock,
so concurrent workers export once and never read a half-written model.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import io
import logging
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer
from torch import nn

logger = logging.getLogger(__name__)

EXPORTER_VERSION = "2"  # bump when the exported graphs change
OPSET = 18


class PromptDecoder(nn.Module):
    """(embedding (1, C, h, w), coords (B, N, 2), labels (B, N)) → low-res logits (B, 1, 4h, 4w)."""

    pe_layer: PositionEmbeddingRandom
    transformer: TwoWayTransformer
    output_upscaling: nn.Sequential
    hypernetwork: nn.Module
    frame: torch.Tensor
    image_pe: torch.Tensor
    no_mask: torch.Tensor
    not_a_point: torch.Tensor
    label_embeds: torch.Tensor
    output_tokens: torch.Tensor

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        encoder, decoder = sam.prompt_encoder, sam.mask_decoder
        self.pe_layer = encoder.pe_layer
        self.transformer = decoder.transformer
        self.output_upscaling = decoder.output_upscaling
        self.hypernetwork = decoder.output_hypernetworks_mlps[0]
        height, width = encoder.input_image_size
        self.register_buffer("frame", torch.tensor([float(width), float(height)]), persistent=False)
        self.register_buffer("image_pe", encoder.get_dense_pe().detach().clone(), persistent=False)
        self.register_buffer("no_mask", encoder.no_mask_embed.weight.detach().reshape(1, -1, 1, 1).clone(),
                             persistent=False)
        self.register_buffer("not_a_point", encoder.not_a_point_embed.weight.detach().clone(), persistent=False)
        self.register_buffer("label_embeds", torch.cat([e.weight.detach() for e in encoder.point_embeddings]),
                             persistent=False)  # (4, C): negative, positive, box corner 1, box corner 2
        self.register_buffer("output_tokens", torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight])
                             .detach().clone(), persistent=False)

    def sparse(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """PromptEncoder._embed_points/_embed_boxes on tokens (coordinates already in the model frame)."""
        embedding = self.pe_layer._pe_encoding((coords + 0.5) / self.frame)
        labels = labels.unsqueeze(-1)
        embedding = embedding * (labels != -1) + self.not_a_point * (labels == -1)
        for index in range(self.label_embeds.shape[0]):
            embedding = embedding + self.label_embeds[index] * (labels == index)
        return embedding

    def forward(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor,
                point_labels: torch.Tensor) -> torch.Tensor:
        sparse = self.sparse(point_coords, point_labels)
        batch = sparse.shape[0]
        tokens = torch.cat([self.output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse], dim=1)
        _, channels, height, width = image_embeddings.shape
        image = (image_embeddings + self.no_mask).flatten(2).transpose(1, 2)  # (1, HW, C): one copy per call
        mask_token, keys = self._two_way(image, self.image_pe.flatten(2).transpose(1, 2), tokens)
        upscaled = self.output_upscaling(keys.transpose(1, 2).reshape(batch, channels, height, width))
        hyper = self.hypernetwork(mask_token)  # the first mask token: the single-mask output
        up_h, up_w = upscaled.shape[-2:]
        return (hyper.unsqueeze(1) @ upscaled.flatten(2)).reshape(batch, 1, up_h, up_w)

    def _two_way(self, image: torch.Tensor, pe: torch.Tensor, tokens: torch.Tensor,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``TwoWayTransformer.forward`` (queries = tokens, keys = image) with the first layer's image
        projections done once for the whole batch and the later image-side projections pulled
        through the few tokens (:func:`_token_to_image`, :func:`_image_to_token`). Returns the first
        mask token after the final attention (B, C) and the image tokens (B, HW, C)."""
        first, second = cast(list[TwoWayAttentionBlock], list(self.transformer.layers))
        image_pe = image + pe
        # layer 0 (skip_first_layer_pe): the image side is the same for every prompt of the batch
        queries = first.norm1(first.self_attn(q=tokens, k=tokens, v=tokens))
        cross = first.cross_attn_token_to_image
        heads = cross.num_heads
        out = _attend(_heads(cross.q_proj(queries + tokens), heads), _heads(cross.k_proj(image_pe), heads),
                      _heads(cross.v_proj(image), heads))
        queries = first.norm2(queries + cross.out_proj(out))
        queries = first.norm3(queries + first.mlp(queries))
        back = first.cross_attn_image_to_token
        keys = first.norm4(image + _image_to_token(back, image_pe, queries + tokens, queries,
                                                   q_heads=_heads(back.q_proj(image_pe), back.num_heads)))
        # layer 1: every prompt has its own image tokens from here on
        q = queries + tokens
        queries = second.norm1(queries + second.self_attn(q=q, k=q, v=queries))
        queries = second.norm2(queries + _token_to_image(second.cross_attn_token_to_image, queries + tokens,
                                                         keys + pe, keys))
        queries = second.norm3(queries + second.mlp(queries))
        keys = second.norm4(keys + _image_to_token(second.cross_attn_image_to_token, keys + pe, queries + tokens,
                                                   queries))
        # final attention: only the first mask token's output is used
        mask = queries[:, 1:2]
        final = _token_to_image(self.transformer.final_attn_token_to_image, mask + tokens[:, 1:2], keys + pe, keys)
        return self.transformer.norm_final_attn(mask + final)[:, 0], keys


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, D) → (B, heads, N, D / heads)"""
    batch, n, dim = x.shape
    return x.reshape(batch, n, heads, dim // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) → (B, N, heads · d)"""
    batch, heads, n, dim = x.shape
    return x.transpose(1, 2).reshape(batch, n, heads * dim)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention of projected heads, merged (``Attention.forward`` before out_proj)."""
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return _merge(attn @ v)


def _token_to_image(attention: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``attention(q=q, k=k, v=v)`` for a few query tokens over the HW image tokens, without projecting
    the image: scores are (q W_k) · k (the key bias adds a constant per query, which the softmax
    drops) and the values are (attn · v) W_v + b_v (attention rows sum to 1). Same result up to
    rounding, with T·heads·HW·C instead of 2·HW·C·D multiply-adds."""
    heads = attention.num_heads
    qh = _heads(attention.q_proj(q), heads)  # (B, H, T, d)
    dim = qh.shape[-1]
    wk = attention.k_proj.weight.reshape(heads, dim, -1)  # (H, d, C)
    attn = torch.softmax((qh @ wk) @ k.unsqueeze(1).transpose(-1, -2) / math.sqrt(dim), dim=-1)  # (B, H, T, HW)
    mixed = attn @ v.unsqueeze(1)  # (B, H, T, C)
    wv = attention.v_proj.weight.reshape(heads, dim, -1)  # (H, d, C)
    values = mixed @ wv.transpose(-1, -2) + attention.v_proj.bias.reshape(heads, 1, dim)
    return attention.out_proj(_merge(values))


def _image_to_token(attention: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                    q_heads: torch.Tensor | None = None) -> torch.Tensor:
    """``attention(q=q, k=k, v=v)`` for the HW image tokens over a few tokens: the image queries are
    not projected (scores are q · (W_q^T k) + b_q · k, unless ``q_heads`` holds them already) and the
    output projection is applied to the tokens' values before mixing (HW·heads·T·C multiply-adds
    instead of HW·D·C)."""
    heads = attention.num_heads
    kh = _heads(attention.k_proj(k), heads)  # (B, H, T, d)
    batch, _, count, dim = kh.shape
    if q_heads is None:
        wq = attention.q_proj.weight.reshape(heads, dim, -1)  # (H, d, C)
        bias = (kh @ attention.q_proj.bias.reshape(heads, dim, 1)).transpose(-1, -2)  # (B, H, 1, T)
        scores = q.unsqueeze(1) @ (kh @ wq).transpose(-1, -2) + bias  # (B, H, HW, T)
    else:
        scores = q_heads @ kh.transpose(-1, -2)
    attn = torch.softmax(scores / math.sqrt(dim), dim=-1)
    vh = _heads(attention.v_proj(v), heads)  # (B, H, T, d)
    wo = attention.out_proj.weight.t().reshape(heads, dim, -1)  # (H, d, C)
    values = (vh @ wo).reshape(batch, heads * count, -1)  # (B, H·T, C)
    mixing = attn.permute(0, 2, 1, 3).reshape(batch, attn.shape[2], heads * count)  # (B, HW, H·T)
    return mixing @ values + attention.out_proj.bias


class _ImageEncoder(nn.Module):
    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(image)


@dataclass(frozen=True)
class OnnxModelFiles:
    encoder: Path
    decoder: Path


def export_dir(cache_dir: Path, name: str, weights_id: str) -> Path:
    return Path(cache_dir) / "onnx" / f"{name}-{weights_id}-e{EXPORTER_VERSION}"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, input_names: list[str],
            dynamic_shapes: dict[str, dict[int, torch.export.Dim]] | None) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()) as progress:
        warnings.simplefilter("ignore")  # the exporter's deprecation and axis-naming notes
        program = torch.onnx.export(module, args, dynamo=True, input_names=input_names, output_names=["output"],
                                    dynamic_shapes=dynamic_shapes, opset_version=OPSET, optimize=True,
                                    verify=False, report=False, verbose=False)
    logger.debug("torch.onnx: %s", progress.getvalue())
    assert program is not None
    program.save(str(path), external_data=True)  # large encoders (ViT-H) exceed protobuf's 2 GB


def export_model(sam: Sam, cache_dir: Path, name: str, weights_id: str) -> OnnxModelFiles:
    """The model's ONNX files, exported now unless an earlier export with the same key exists."""
    final = export_dir(cache_dir, name, weights_id)
    files = OnnxModelFiles(final / "encoder.onnx", final / "decoder.onnx")
    if files.encoder.exists() and files.decoder.exists():
        return files
    with _locked(final.with_name(final.name + ".lock")):
        if files.encoder.exists() and files.decoder.exists():  # another process exported it meanwhile
            return files
        logger.info("exporting %s (%s) to ONNX under %s", name, weights_id, final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            _export_into(sam, tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return files


@torch.no_grad()
def _export_into(sam: Sam, directory: Path) -> None:
    sam = sam.to("cpu").eval()
    side = sam.image_encoder.img_size
    _export(_ImageEncoder(sam), (torch.zeros(1, 3, side, side),), directory / "encoder.onnx", ["image"], None)
    _export_decoder(sam, directory / "decoder.onnx")


def web_decoder(sam: Sam, cache_dir: Path, name: str, weights_id: str) -> Path:
    """The prompt decoder as ONE self-contained ``.onnx`` file (weights inline, as a browser loads it).

    Converted from the backend's export when there is one (the same graph the ONNX backend runs), else
    the decoder alone is exported (the torch backend never needs the encoder's export)."""
    final = export_dir(cache_dir, name, weights_id)
    target = final.with_name(final.name + "-web") / "decoder.onnx"
    if target.exists():
        return target
    with _locked(target.parent.with_name(target.parent.name + ".lock")):
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".decoder-", dir=target.parent) as tmp:
            source = final / "decoder.onnx"
            if not source.exists():
                source = Path(tmp) / "decoder.onnx"
                on_cpu = all(p.device.type == "cpu" for p in sam.parameters())
                with torch.no_grad():  # a CUDA engine's model stays where it is: export a CPU copy
                    _export_decoder((sam if on_cpu else copy.deepcopy(sam).to("cpu")).eval(), source)
            single = Path(tmp) / "single.onnx"
            single.write_bytes(inline_external_data(source))
            os.replace(single, target)
    return target


def inline_external_data(path: Path) -> bytes:
    """The model at ``path`` serialized with its external tensors (``*.onnx.data``) inlined."""
    import onnx

    model = onnx.load(str(path), load_external_data=True)  # tensors become inline (data_location DEFAULT)
    return cast(bytes, model.SerializeToString())


def _export_decoder(sam: Sam, path: Path) -> None:
    side = sam.image_encoder.img_size
    embed_h, embed_w = sam.prompt_encoder.image_embedding_size
    embedding = torch.zeros(1, sam.prompt_encoder.embed_dim, embed_h, embed_w)
    coords = torch.rand(2, 3, 2) * side
    labels = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, -1.0]])
    batch, tokens = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("tokens", min=1, max=1024)
    _export(PromptDecoder(sam), (embedding, coords, labels), path,
            ["image_embeddings", "point_coords", "point_labels"],
            {"image_embeddings": {}, "point_coords": {0: batch, 1: tokens}, "point_labels": {0: batch, 1: tokens}})
