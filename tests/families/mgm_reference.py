"""An independent Mini-Gemini forward for tests, written from the MGM paper and its checkpoints' key
names (timm ConvNeXt keys, `vlm_uni_*` mining, `mm_projector.0/2`), sharing no code with vlmtune:
logits of a converted or built model must equal it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _ln2d(x, w, b):  # LayerNorm over channels of [batch, channels, h, w]
    return F.layer_norm(x.permute(0, 2, 3, 1), w.shape, w, b, 1e-6).permute(0, 3, 1, 2)


def convnext_stages(state: dict, prefix: str, x: torch.Tensor) -> list[torch.Tensor]:
    """timm ConvNeXt trunk (`stem.*`, `stages.*`) -> every stage's output."""
    s = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
    x = _ln2d(F.conv2d(x, s["stem.0.weight"], s["stem.0.bias"], stride=4), s["stem.1.weight"], s["stem.1.bias"])
    outs, stage = [], 0
    while f"stages.{stage}.blocks.0.conv_dw.weight" in s:
        p = f"stages.{stage}."
        if p + "downsample.0.weight" in s:
            x = _ln2d(x, s[p + "downsample.0.weight"], s[p + "downsample.0.bias"])
            x = F.conv2d(x, s[p + "downsample.1.weight"], s[p + "downsample.1.bias"], stride=2)
        block = 0
        while f"{p}blocks.{block}.conv_dw.weight" in s:
            b = f"{p}blocks.{block}."
            y = F.conv2d(x, s[b + "conv_dw.weight"], s[b + "conv_dw.bias"], padding=3, groups=x.shape[1])
            y = y.permute(0, 2, 3, 1)
            y = F.layer_norm(y, (y.shape[-1],), s[b + "norm.weight"], s[b + "norm.bias"], 1e-6)
            y = F.linear(F.gelu(F.linear(y, s[b + "mlp.fc1.weight"], s[b + "mlp.fc1.bias"])),
                         s[b + "mlp.fc2.weight"], s[b + "mlp.fc2.bias"])
            x = x + y.permute(0, 3, 1, 2) * s[b + "gamma"].reshape(1, -1, 1, 1)
            block += 1
        outs.append(x)
        stage += 1
    return outs


def aux_features(state, prefix, pixel_values_aux):
    stages = convnext_stages(state, prefix, pixel_values_aux.float())
    size = stages[0].shape[-2:]
    return torch.cat([stages[0]] + [F.interpolate(s, size=size, mode="bilinear", align_corners=False)
                                    for s in stages[1:]], 1)


def mining(state, prefix, tokens, aux):
    """MGM's patch-info mining with its own key names (`vlm_uni_{query,aux,val}_projector.{0,1}`)."""
    def norm_linear(name, x):
        w = lambda k: state[f"{prefix}vlm_uni_{name}_projector.{k}"].float()  # noqa: E731
        x = F.layer_norm(x, (x.shape[-1],), w("0.weight"), w("0.bias"))
        return F.linear(x, w("1.weight"), w("1.bias"))
    b, n, _ = tokens.shape
    g = int(n ** 0.5)
    win = aux.shape[-1] // g
    a = aux.permute(0, 2, 3, 1).reshape(b, g, win, g, win, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, n, win * win, -1)
    q, k, v = norm_linear("query", tokens), norm_linear("aux", a), norm_linear("val", a)
    att = torch.einsum("bnd,bnpd->bnp", q, k) / k.shape[-1] ** 0.5
    return tokens + torch.einsum("bnp,bnpd->bnd", att.softmax(-1), v)


def hd_views(pixel_values_aux, size: int, grid: int, global_view: bool) -> torch.Tensor:
    """MGM's dataset: the ViT's views of one aux image, cut by slicing (MGM reshapes and permutes): the
    aux tensor downsampled to grid * size, its crops row by row, then the whole at `size`."""
    image = F.interpolate(pixel_values_aux.float(), size=(size * grid, size * grid), mode="bilinear", align_corners=False)
    if grid == 1:
        return image
    views = [image[:, :, y * size:(y + 1) * size, x * size:(x + 1) * size] for y in range(grid) for x in range(grid)]
    if global_view:
        views.append(F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False))
    return torch.cat(views)


def original_logits(state: dict, llm_dir, vit_config: dict, pixel_values, pixel_values_aux, before, after,
                    grid: int = 1, global_view: bool = False):
    """MGM's forward on its own key names: CLIP (layer -2, CLS dropped) + mined ConvNeXt windows ->
    mm_projector -> the image spliced between the `before` and `after` token ids of the Llama LLM.
    MGM-HD (`grid` 2): each crop mines its own part of the aux map, the global view the whole map
    downsampled by `grid`, and the tokens go global first, then the crops."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaForCausalLM

    vit = CLIPVisionModel(CLIPVisionConfig(**vit_config))
    prefix = "model.vision_tower.vision_tower.vision_model."
    vit.load_state_dict({k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}, strict=False)
    llm = LlamaForCausalLM.from_pretrained(llm_dir)
    llm.load_state_dict({k: v for k, v in state.items() if k.startswith(("model.layers", "model.embed", "model.norm", "lm_head"))})
    with torch.no_grad():
        tokens = vit(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        aux_state = {k.replace("model.vision_tower_aux.vision_", ""): v for k, v in state.items()
                     if k.startswith("model.vision_tower_aux.")}
        aux = aux_features(aux_state, "", pixel_values_aux)
        part = aux.shape[-1] // grid
        mined = [mining(state, "model.", tokens[i:i + 1], aux[..., y * part:(y + 1) * part, x * part:(x + 1) * part])
                 for i, (y, x) in enumerate((y, x) for y in range(grid) for x in range(grid))]
        if global_view:
            whole = F.interpolate(aux, scale_factor=1 / grid, mode="bilinear", align_corners=False)
            mined.insert(0, mining(state, "model.", tokens[-1:], whole))
        tokens = torch.cat(mined, 1)
        w = lambda k: state[f"model.mm_projector.{k}"]  # noqa: E731
        image = F.linear(F.gelu(F.linear(tokens, w("0.weight"), w("0.bias"))), w("2.weight"), w("2.bias"))
        embed = llm.get_input_embeddings()
        embeds = torch.cat([embed(torch.tensor([before])), image, embed(torch.tensor([after]))], 1)
        return llm(inputs_embeds=embeds).logits
