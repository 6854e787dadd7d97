"""Tiny random models of every family, built from configs (no hub), with processors and chat templates,
and three kinds of tokenizer: SentencePiece (Llama-2 / Vicuna: Metaspace, adds BOS), byte-level BPE
(Qwen: no BOS) and byte-level BPE that adds BOS itself (Llama-3)."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm
import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = ["What color is the image? red green blue. Describe the picture. It is a plain square. Hello there, how are you?",
          "The system says: be brief. Yes no maybe. one two three four five six seven eight nine ten",
          "USER ASSISTANT user assistant model system chat a an the is of to"] * 4
LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             max_position_embeddings=512, tie_word_embeddings=False)
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8)
TOKENIZER_KINDS = ("sentencepiece", "bytelevel", "bytelevel_bos")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
          "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}{{ image_open }}{% else %}{{ p['text'] }}"
          "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_template(image_text: str) -> str:
    return CHATML.replace("{{ image_open }}", image_text)


def tokenizer(kind: str, special: list[str], folder: Path) -> T.PreTrainedTokenizerFast:
    """A trained tokenizer of `kind` with the family's special tokens."""
    if kind == "sentencepiece":
        folder.mkdir(parents=True, exist_ok=True)
        corpus = folder / "corpus.txt"
        corpus.write_text("\n".join(CORPUS))
        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=400,
                                       model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                       character_coverage=1.0, byte_fallback=True, minloglevel=2)
        tok = T.LlamaTokenizer.from_pretrained(folder, legacy=False, add_bos_token=True)  # as Vicuna's config says
        tok.pad_token = tok.unk_token
    else:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        base = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>"]
        backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=base,
                                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        bos = None
        if kind == "bytelevel_bos":
            bos = "<|begin_of_text|>"
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
        tok = T.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token=None)
    chatml = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tok.get_vocab()]
    tok.add_special_tokens({"additional_special_tokens": chatml + special}, replace_extra_special_tokens=False)
    return tok


def _ids(tok, *tokens):
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def build(family: str, folder: Path, kind: str = "sentencepiece", seed: int = 0) -> Path:
    """Save a tiny random `family` model with its processor in `folder`."""
    torch.manual_seed(seed)
    folder = Path(folder)
    model, processor = BUILDERS[family](folder / "tokenizer-src", kind)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _llava(src, kind):
    tok = tokenizer(kind, ["<image>"], src)
    image_id, = _ids(tok, "<image>")
    config = T.LlavaConfig(vision_config={**CLIP, "model_type": "clip_vision_model"},
                           text_config={**LLAMA, "model_type": "llama", "vocab_size": len(tok)},
                           image_token_index=image_id, vision_feature_layer=-2, vision_feature_select_strategy="default")
    processor = T.LlavaProcessor(T.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
                                 tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                 chat_template=chat_template("<image>\n"))
    return T.LlavaForConditionalGeneration(config), processor


def _llava_next(src, kind):
    tok = tokenizer(kind, ["<image>"], src)
    image_id, = _ids(tok, "<image>")
    pinpoints = [[16, 16], [16, 32], [32, 16], [32, 32]]
    config = T.LlavaNextConfig(vision_config={**CLIP, "model_type": "clip_vision_model"},
                               text_config={**LLAMA, "model_type": "llama", "vocab_size": len(tok)},
                               image_token_index=image_id, image_grid_pinpoints=pinpoints)
    images = T.LlavaNextImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                       image_grid_pinpoints=pinpoints)
    processor = T.LlavaNextProcessor(images, tok, patch_size=8, vision_feature_select_strategy="default",
                                     num_additional_image_tokens=1, chat_template=chat_template("<image>\n"))
    return T.LlavaNextForConditionalGeneration(config), processor


QWEN_SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                   temporal_patch_size=2, in_channels=3)


def _qwen(config_class, model_class, vision, text_extra):
    def make(src, kind):
        tok = tokenizer(kind, QWEN_SPECIAL, src)
        start, end, image, video = _ids(tok, *QWEN_SPECIAL)
        rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0, **text_extra.pop("rope", {})}
        config = config_class(text_config={**LLAMA, "vocab_size": len(tok), "rope_parameters": rope, **text_extra},
                              vision_config=vision, image_token_id=image, video_token_id=video,
                              vision_start_token_id=start, vision_end_token_id=end)
        config.text_config.bos_token_id = tok.bos_token_id
        config.text_config.eos_token_id = tok.eos_token_id
        config.text_config.pad_token_id = tok.pad_token_id
        patch = vision["patch_size"]
        images = T.Qwen2VLImageProcessor(min_pixels=(2 * patch) ** 2, max_pixels=(8 * patch) ** 2, patch_size=patch,
                                         merge_size=2, temporal_patch_size=2)
        videos = T.Qwen2VLVideoProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2)
        processor = T.Qwen2VLProcessor(images, tok, videos,
                                       chat_template=chat_template("<|vision_start|><|image_pad|><|vision_end|>"))
        return model_class(config), processor
    return make


def _idefics(config_class, model_class, processor_class, video_class):
    def make(src, kind):
        rows = [f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)]
        tok = tokenizer(kind, ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"] + rows, src)
        image_id, = _ids(tok, "<image>")
        config = config_class(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=2, image_size=16, patch_size=4),
                              text_config={**LLAMA, "model_type": "llama", "vocab_size": len(tok),
                                           "pad_token_id": tok.pad_token_id},
                              scale_factor=2, image_token_id=image_id)
        images = T.Idefics3ImageProcessor(size={"longest_edge": 32}, max_image_size={"longest_edge": 16})
        extra = {"video_processor": video_class()} if video_class else {}
        processor = processor_class(image_processor=images, tokenizer=tok, image_seq_len=4,
                                    chat_template=chat_template("<image>"), **extra)
        return model_class(config), processor
    return make


def _gemma3(src, kind):
    tokenizer(kind, ["<start_of_image>", "<end_of_image>", "<image_soft_token>"], src).save_pretrained(src / "gemma")
    tok = T.AutoTokenizer.from_pretrained(src / "gemma", extra_special_tokens={  # Gemma 3's named tokens
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    boi, eoi, image = _ids(tok, "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    config = T.Gemma3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=4, model_type="siglip_vision_model"),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, vocab_size=len(tok), model_type="gemma3_text",
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        mm_tokens_per_image=4, image_token_index=image, boi_token_index=boi, eoi_token_index=eoi)
    images = T.Gemma3ImageProcessor(size={"height": 16, "width": 16})
    processor = T.Gemma3Processor(images, tok, image_seq_length=4, chat_template=chat_template("<start_of_image>"))
    return T.Gemma3ForConditionalGeneration(config), processor


BUILDERS = {
    "llava": _llava,
    "llava_next": _llava_next,
    "qwen2_vl": _qwen(T.Qwen2VLConfig, T.Qwen2VLForConditionalGeneration, {**QWEN_VISION, "embed_dim": 32, "mlp_ratio": 2}, {}),
    "qwen2_5_vl": _qwen(T.Qwen2_5_VLConfig, T.Qwen2_5_VLForConditionalGeneration,
                        {**QWEN_VISION, "out_hidden_size": 32, "fullatt_block_indexes": [1], "window_size": 16}, {}),
    "qwen3_vl": _qwen(T.Qwen3VLConfig, T.Qwen3VLForConditionalGeneration,
                      {**QWEN_VISION, "out_hidden_size": 32, "deepstack_visual_indexes": [1], "num_position_embeddings": 16},
                      {"head_dim": 16, "rope": {"mrope_interleaved": True}}),
    "idefics3": _idefics(T.Idefics3Config, T.Idefics3ForConditionalGeneration, T.Idefics3Processor, None),
    "smolvlm": _idefics(T.SmolVLMConfig, T.SmolVLMForConditionalGeneration, T.SmolVLMProcessor, T.SmolVLMVideoProcessor),
    "gemma3": _gemma3,
}


def build_vipllava(folder: Path, kind: str = "bytelevel") -> Path:
    """A family vlmtune has no entry for (VipLLaVA), to be tuned through `model.components`."""
    torch.manual_seed(0)
    tok = tokenizer(kind, ["<image>"], folder / "tokenizer-src")
    image_id, = _ids(tok, "<image>")
    config = T.VipLlavaConfig(vision_config={**CLIP, "model_type": "clip_vision_model"},
                              text_config={**LLAMA, "model_type": "llama", "vocab_size": len(tok)},
                              image_token_index=image_id, vision_feature_layers=[-2, -1])
    processor = T.LlavaProcessor(T.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
                                 tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                 chat_template=chat_template("<image>\n"))
    T.VipLlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


MINICPM_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "image_start_token": "<image>",
                  "image_end_token": "</image>", "slice_start_token": "<slice>", "slice_end_token": "</slice>",
                  "image_id_start_token": "<image_id>", "image_id_end_token": "</image_id>"}


def _minicpmv4_6(src, kind):
    tokenizer(kind, list(MINICPM_TOKENS.values()), src).save_pretrained(src / "minicpm")
    tok = T.AutoTokenizer.from_pretrained(src / "minicpm", extra_special_tokens=MINICPM_TOKENS)
    image, video = _ids(tok, MINICPM_TOKENS["image_token"], MINICPM_TOKENS["video_token"])
    config = T.MiniCPMV4_6Config(
        text_config=dict(model_type="qwen3", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=len(tok),
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14),
        insert_layer_id=1, image_size=56, image_token_id=image, video_token_id=video)
    images = T.MiniCPMV4_6ImageProcessor(scale_resolution=56, patch_size=14, max_slice_nums=4)
    videos = T.MiniCPMV4_6VideoProcessor(scale_resolution=56, patch_size=14, max_slice_nums=1)
    processor = T.MiniCPMV4_6Processor(images, videos, tok, chat_template=chat_template(MINICPM_TOKENS["image_token"]))
    return T.MiniCPMV4_6ForConditionalGeneration(config), processor


BUILDERS["minicpmv4_6"] = _minicpmv4_6


CONVNEXT = dict(model_type="convnext", hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], image_size=32)


def _mgm(src, kind):
    """Mini-Gemini: ViT at 16 (2x2 tokens), ConvNeXt at 32 (an 8x8 first stage: a 4x4 window per token)."""
    from vlmtune.models.mgm.configuration_mgm import MGMConfig
    from vlmtune.models.mgm.modeling_mgm import MGMForConditionalGeneration
    from vlmtune.models.mgm.processing_mgm import MGMImageProcessor, MGMProcessor

    tok = tokenizer(kind, ["<image>"], src)
    image_id, = _ids(tok, "<image>")
    config = MGMConfig(vision_config={**CLIP, "model_type": "clip_vision_model"}, vision_aux_config=CONVNEXT,
                       text_config={**LLAMA, "model_type": "llama", "vocab_size": len(tok)},
                       image_token_id=image_id, image_size_aux=32)
    images = MGMImageProcessor(image_size=16, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = MGMProcessor(images, tok, patch_size=8, chat_template=chat_template("<image>\n"))
    return MGMForConditionalGeneration(config), processor


BUILDERS["mgm"] = _mgm
