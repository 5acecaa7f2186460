"""A literal formulation of the EfficientSAM decoder, as written in the architecture notes.

Not used for serving. It tiles the image embedding per query, projects every image token in
every attention, uses softmax(QK^T)V and the plain upscaling modules, exactly like the reference
code does. It is the oracle that tests hold the fast decoder to, and the baseline of the click
benchmark. It reads the parameters of an :class:`EfficientSam`; it has none of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from efficientsam.modeling import EfficientSam
from efficientsam.modeling.two_way_transformer import Attention


def _attention(module: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    def split(x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        heads = module.num_heads
        return x.reshape(batch, tokens, heads, channels // heads).transpose(1, 2)

    query, key, value = split(module.q_proj(q)), split(module.k_proj(k)), split(module.v_proj(v))
    weights = (query @ key.transpose(-2, -1)) / query.shape[-1] ** 0.5
    out = weights.softmax(dim=-1) @ value
    batch, heads, tokens, head_dim = out.shape
    return module.out_proj(out.transpose(1, 2).reshape(batch, tokens, heads * head_dim))


def reference_predict_masks(
    model: EfficientSam,
    image_embeddings: torch.Tensor,
    batched_points: torch.Tensor,
    batched_point_labels: torch.Tensor,
    multimask_output: bool,
    input_h: int,
    input_w: int,
    output_h: int = -1,
    output_w: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :meth:`EfficientSam.predict_masks`, computed the reference way."""
    points, labels = model.fit_to_prompt_tokens(batched_points.float(), batched_point_labels.long())
    sparse = model.prompt_encoder(model.rescale_points(points, input_h, input_w), labels)
    batch, num_queries, num_points, channels = sparse.shape
    sparse = sparse.reshape(batch * num_queries, num_points, channels)
    decoder = model.mask_decoder
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.expand(sparse.shape[0], -1, -1), sparse], dim=1)

    image = image_embeddings.repeat_interleave(num_queries, dim=0)
    image_pe = model.prompt_encoder.pe_layer(tuple(image.shape[-2:])).unsqueeze(0)
    keys = image.flatten(2).permute(0, 2, 1)
    key_pe = image_pe.flatten(2).permute(0, 2, 1)
    queries, query_pe = tokens, tokens
    transformer = decoder.transformer
    for index, layer in enumerate(transformer.layers):
        if index > 0:
            queries = queries + query_pe
        queries = layer.norm1(queries + _attention(layer.self_attn, queries, queries, queries))
        attended = _attention(
            layer.cross_attn_token_to_image, queries + query_pe, keys + key_pe, keys
        )
        queries = layer.norm2(queries + attended)
        queries = layer.norm3(queries + layer.mlp(queries))
        attended = _attention(
            layer.cross_attn_image_to_token, keys + key_pe, queries + query_pe, queries
        )
        keys = layer.norm4(keys + attended)
    attended = _attention(
        transformer.final_attn_token_to_image, queries + query_pe, keys + key_pe, keys
    )
    queries = transformer.norm_final_attn(queries + attended)

    upscaled = keys.transpose(1, 2).reshape(image.shape)
    for stage in decoder.final_output_upscaling_layers:
        upscaled = stage(upscaled)
    hyper_in = torch.stack(
        [mlp(queries[:, 1 + i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
    )
    masks = (hyper_in @ upscaled.flatten(2)).reshape(
        batch, num_queries, decoder.num_mask_tokens, *upscaled.shape[-2:]
    )
    iou = decoder.iou_prediction_head(queries[:, 0]).reshape(batch, num_queries, -1)
    selected = slice(1, None) if multimask_output else slice(0, 1)
    masks, iou = masks[:, :, selected], iou[:, :, selected]
    if output_h > 0 and output_w > 0:
        upsampled = F.interpolate(
            masks.flatten(0, 1), (output_h, output_w), mode="bicubic", align_corners=False
        )
        masks = upsampled.reshape(batch, num_queries, -1, output_h, output_w)
    return masks, iou
