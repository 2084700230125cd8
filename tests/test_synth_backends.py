"""jedi-synth backends on tiny models built from configs and saved locally (nothing is downloaded):
diffusers collage -> split -> shards, LLM subjects, open_clip consistency filter, captioning model."""
import io
import json

import numpy as np
import pytest
import torch
from helpers.synth import read_samples, synth_cfg, view_sets
from PIL import Image

from data_pipelines.schema import parse_meta, validate_sample
from data_pipelines.synth import cli
from data_pipelines.synth.collage import CollageDrawer
from data_pipelines.synth.filter import build_filter
from data_pipelines.synth.prompts import build_prompt_source
from data_pipelines.synth.split import split_grid
from data_pipelines.synth.stages import set_seed
from data_pipelines.synth.writer import SynthError

pytestmark = pytest.mark.usefixtures("one_thread")


def read_sets(out_dir):
    """(meta, [decoded images]) per set, over every shard of out_dir in order."""
    sets = []
    for tar in sorted(out_dir.glob("*.tar")):
        for s in read_samples(tar):
            assert validate_sample(s) is None
            meta = parse_meta(s["json"])
            imgs = [np.asarray(Image.open(io.BytesIO(s[f"{i}.{meta['image_ext']}"])).convert("RGB"))
                    for i in range(meta["num_images"])]
            sets.append((meta, imgs))
    return sets


# -- tiny models -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_t2i_dir(tmp_path_factory):
    """A StableDiffusionPipeline of random tiny parts (latent UNet, VAE, CLIP text encoder, offline BPE)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from jedi_train.models.tiny import build_tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny_t2i")
    torch.manual_seed(0)
    tok = build_tiny_tokenizer(str(d / "tok"), model_max_length=32)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32))
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=2, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
    StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=DDIMScheduler(),
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(d / "pipe")
    return d / "pipe"


@pytest.fixture(scope="module")
def tiny_llm_dir(tmp_path_factory):
    """A random 1-layer GPT-2 with a byte-level BPE trained here on the shipped word lists."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from data_pipelines.synth.prompts import HERE, read_word_list

    d = tmp_path_factory.mktemp("tiny_llm")
    words = read_word_list(HERE / "words_objects.txt") + read_word_list(HERE / "words_attributes.txt")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(words, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.save_pretrained(d)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=1, n_head=2,
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(d)
    return d


DIFFUSERS_ARGS = ("generator=diffusers", "generator.steps=2", "generator.guidance_scale=2.0", "resolution=16",
                  "set_size=3", "num_sets=4", "sets_per_shard=2", "generator.batch_size=2", "image_ext=png")


# -- diffusers collage backend -----------------------------------------------------------------------
def test_diffusers_collage_end_to_end(tiny_t2i_dir, tmp_path):
    args = (*DIFFUSERS_ARGS, f"generator.model_dir={tiny_t2i_dir}", "split.blank_std=0")
    s = cli.run(synth_cfg(tmp_path / "a", *args))
    assert s["sets"] + sum(s["rejects"].values()) == 4 and s["manifest_complete"]
    sets = read_sets(tmp_path / "a")
    assert len(sets) == s["sets"] >= 3  # random weights still draw textured, distinct panels
    drawer = CollageDrawer(str(tiny_t2i_dir), 2, 2, 16, steps=2, guidance_scale=2.0,
                           negative_prompt=synth_cfg(tmp_path, "generator=diffusers").generator.negative_prompt)
    for n, (meta, imgs) in enumerate(sets):
        assert meta["generator"] == "diffusers" and len(imgs) == 3 and imgs[0].shape == (16, 16, 3)
        sub = meta["subject"]
        assert sub["source"] == "templates" and sub["description"] in sub["collage_prompt"]
        assert "2x2 photo collage" in sub["collage_prompt"]
        for cap, scene in zip(meta["captions"], meta["scenes"]):
            assert cap == f"a photo of a {meta['class']} {scene}" and scene in sub["collage_prompt"]
        if n >= 2:
            continue
        # the shard's panels are exactly the collage this set's seed draws, cut into its grid
        index = int(meta["set_id"].rsplit("-", 1)[1])
        collage = drawer.draw([sub["collage_prompt"]], [set_seed(0, index)])[0]
        assert collage.size == (32, 32)
        grid = tuple(sub["grid"])
        panels = split_grid(collage, *grid)
        kept = [k for k in range(len(panels)) if str(k) not in sub["dropped_panels"]][:3]
        for k, img in zip(kept, imgs):
            assert np.array_equal(panels[k], img)
    cli.run(synth_cfg(tmp_path / "b", *args[:-1], "num_sets=2", "split.blank_std=0"))  # unit 0 alone, elsewhere
    first = "sets-000000.tar"
    assert (tmp_path / "a" / first).read_bytes() == (tmp_path / "b" / first).read_bytes()


def test_collage_rows_cols_must_hold_a_set(tiny_t2i_dir, tmp_path):
    with pytest.raises(SynthError, match="a 1x2 collage has fewer panels than set_size=3"):
        cli.run(synth_cfg(tmp_path, *DIFFUSERS_ARGS, f"generator.model_dir={tiny_t2i_dir}",
                          "generator.rows=1", "generator.cols=2"))
    assert not (tmp_path / ".jedi-synth").exists()


# -- LLM subjects ------------------------------------------------------------------------------------
def test_llm_subjects_end_to_end(tiny_t2i_dir, tiny_llm_dir, tmp_path):
    args = (*DIFFUSERS_ARGS, f"generator.model_dir={tiny_t2i_dir}", "split.blank_std=0", "prompts=llm",
            f"prompts.model_dir={tiny_llm_dir}", "prompts.max_new_tokens=12", "prompts.batch_size=2")
    s = cli.run(synth_cfg(tmp_path / "a", *args))
    sets = read_sets(tmp_path / "a")
    assert len(sets) == s["sets"] >= 3
    subjects = [m["subject"] for m, _ in sets]
    assert {x["source"] for x in subjects} <= {"llm", "llm_fallback"}
    assert any(x["source"] == "llm" for x in subjects)  # the model's own words made it into a prompt
    for x in subjects:
        assert x["description"].isprintable() and x["description"] in x["collage_prompt"]
        assert x["cls"] and x["cls"] not in ("", "object")
    # sampling is seeded per batch: the first batch (sets 0, 1) again gives the same subjects
    again = build_prompt_source(synth_cfg(tmp_path, *args).prompts).subjects([set_seed(0, 0), set_seed(0, 1)])
    first = {int(m["set_id"].rsplit("-", 1)[1]): m["subject"] for m, _ in sets}
    assert first.keys() & {0, 1}
    for i, sub in enumerate(again):
        if i in first:
            assert {k: first[i][k] for k in ("cls", "description", "source")} == sub.to_json()


def test_llm_missing_model_dir_is_refused(tiny_t2i_dir, tmp_path):
    with pytest.raises(SynthError, match="prompts.model_dir=/no/llm does not exist"):
        cli.run(synth_cfg(tmp_path / "o", *DIFFUSERS_ARGS, f"generator.model_dir={tiny_t2i_dir}", "prompts=llm",
                          "prompts.model_dir=/no/llm"))
    assert not (tmp_path / "o").exists()


# -- open_clip consistency filter --------------------------------------------------------------------
CLIP_CFG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                                            "head_width": 32},
            "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny open_clip model from a config JSON; its image tower is trained for a few seconds to match views
    of one procedural subject (random weights see only global colour and cannot judge identity)."""
    import open_clip
    import torch.nn.functional as F

    d = tmp_path_factory.mktemp("tiny_clip")
    (d / "synth-tiny-clip.json").write_text(json.dumps(CLIP_CFG))
    open_clip.add_model_config(str(d / "synth-tiny-clip.json"))
    torch.manual_seed(0)
    model, _, pre = open_clip.create_model_and_transforms("synth-tiny-clip")
    X = torch.stack([torch.stack([pre(Image.fromarray(a)) for a in view_sets(10_000 + s)[0]])
                     for s in range(192)])
    opt = torch.optim.AdamW(model.visual.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):  # InfoNCE between two views of 64 subjects
        idx, v = torch.randperm(len(X), generator=g)[:64], torch.randint(0, 4, (64, 2), generator=g)
        za = F.normalize(model.encode_image(X[idx, v[:, 0]]), dim=-1)
        zb = F.normalize(model.encode_image(X[idx, v[:, 1]]), dim=-1)
        logits = za @ zb.T / 0.1
        loss = F.cross_entropy(logits, torch.arange(64)) + F.cross_entropy(logits.T, torch.arange(64))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(model.state_dict(), d / "tiny_clip.pt")
    return {"filter.model": "synth-tiny-clip", "filter.model_config": str(d / "synth-tiny-clip.json"),
            "filter.pretrained": str(d / "tiny_clip.pt")}


def test_open_clip_filter_keeps_one_subject_and_rejects_mixed(tiny_clip, tmp_path):
    cfg = synth_cfg(tmp_path, "filter=open_clip", *(f"{k}={v}" for k, v in tiny_clip.items()),
                    "filter.min_similarity=0.1")
    f = build_filter(cfg.filter)
    e = f.embed(view_sets(0)[0])
    assert e.shape == (4, 32) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    kept = rejected = 0
    for seed in range(10):  # held out: none of these subjects was seen in training
        same, mixed = view_sets(seed)
        (r_same, _), (r_mixed, s_mixed) = f.check(same), f.check(mixed)
        kept += r_same is None
        rejected += r_mixed == "inconsistent_subject"
        assert s_mixed["min"] < s_mixed["max"] <= 1.0
    assert kept >= 8 and rejected >= 8, (kept, rejected)


def test_rejects_are_recorded_by_reason(tiny_clip, tmp_path):
    """A run whose filter rejects: every candidate is either written or counted under its reason, the
    json of kept sets carries the similarity numbers, and nothing is replaced (num_sets are candidates)."""
    overrides = ("num_sets=12", "set_size=3", "resolution=32", "sets_per_shard=6", "filter=open_clip",
                 *(f"{k}={v}" for k, v in tiny_clip.items()), "filter.min_similarity=0.3")
    s = cli.run(synth_cfg(tmp_path, *overrides))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["rejects"]) <= {"inconsistent_subject", "near_duplicate"}
    assert manifest["rejects"] == s["rejects"] and manifest["sets"] == s["sets"]
    assert manifest["sets"] + sum(manifest["rejects"].values()) == 12
    assert manifest["config"]["filter"]["embedder"] == "open_clip"
    sets = read_sets(tmp_path)
    assert len(sets) == manifest["sets"] > 0
    assert all(m["similarity"]["min"] >= 0.3 for m, _ in sets)
    strict = cli.run(synth_cfg(tmp_path / "strict", *overrides[:-1], "num_sets=4", "filter.min_similarity=1.01"))
    assert strict["sets"] == 0 and strict["rejects"] == {"inconsistent_subject": 4}
    assert json.loads((tmp_path / "strict" / "manifest.json").read_text())["rejects"] == strict["rejects"]


# -- captioning model --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_captioner_dir(tmp_path_factory):
    """A random tiny BLIP (vision encoder + text decoder) with a word-level BERT vocabulary written here."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    d = tmp_path_factory.mktemp("tiny_blip")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "toy", "on", "the", "beach", "snow"]
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizer(str(d / "vocab.txt"))
    text = {"vocab_size": len(words), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "encoder_hidden_size": 32, "max_position_embeddings": 32,
            "bos_token_id": tok.cls_token_id, "pad_token_id": tok.pad_token_id, "sep_token_id": tok.sep_token_id,
            "eos_token_id": tok.sep_token_id}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    torch.manual_seed(0)
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(d)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(d)
    return d


def test_caption_model_end_to_end(tiny_captioner_dir, tmp_path):
    vocab = set((tiny_captioner_dir / "vocab.txt").read_text().split())
    s = cli.run(synth_cfg(tmp_path, "num_sets=3", "set_size=2", "resolution=32", "caption=model",
                          f"caption.model_dir={tiny_captioner_dir}", "caption.max_new_tokens=5",
                          "caption.prefix=a photo of"))
    sets = read_sets(tmp_path)
    assert s["sets"] == len(sets) == 3
    for meta, _ in sets:
        assert len(meta["captions"]) == 2 and len(meta["prompt_captions"]) == 2
        for cap, prompt_cap in zip(meta["captions"], meta["prompt_captions"]):
            assert cap.startswith("a photo of ") and len(cap.split()) > 3 and set(cap.split()) <= vocab
            assert meta["class"] in prompt_cap  # the generator's caption is kept next to the model's
