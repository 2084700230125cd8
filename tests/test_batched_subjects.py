"""Several subjects in one pipeline call (prompt = one list per subject): each subject's images are those of a
call of its own with its own generator, with and without the reference cache, with padded and split sets."""
import numpy as np
import pytest
import torch
from helpers.pipelines import load, make_pipeline_dir

from jedi_train.pipelines.set_plan import SetPlan

pytestmark = pytest.mark.usefixtures("one_thread")

KW = {"num_inference_steps": 2, "guidance_scale": 3.0, "image_guidance_scale": 2.0, "output_type": "pt"}


def subject_refs(k: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(k)]


SUBJECTS = [  # (references, prompts, reference captions): unequal prompt counts -> unequal sets, padding
    (subject_refs(2, 0), ["a can", "a can on a beach", "a can in snow"], ["a can", "a can"]),
    (subject_refs(2, 1), ["a dog"], ["a dog", "a dog on grass"]),
    (subject_refs(2, 2), ["a toy", "a toy on a table"], None),
]


def alone(pipe, i, **kw):
    refs, prompts, caps = SUBJECTS[i]
    return pipe(reference_images=refs, prompt=prompts, reference_captions=caps,
                generator=torch.Generator().manual_seed(10 + i), **{**KW, **kw}).images


def together(pipe, **kw):
    return pipe(reference_images=[s[0] for s in SUBJECTS], prompt=[s[1] for s in SUBJECTS],
                reference_captions=[s[2] for s in SUBJECTS],
                generator=[torch.Generator().manual_seed(10 + i) for i in range(len(SUBJECTS))], **{**KW, **kw})


@pytest.fixture(scope="module")
def pipes(tiny_model_dir, tmp_path_factory):
    """A model that can use the reference cache, and one that cannot (references re-noised to t)."""
    return {"cache": load(make_pipeline_dir(tiny_model_dir, str(tmp_path_factory.mktemp("p1")), "references")),
            "target": load(make_pipeline_dir(tiny_model_dir, str(tmp_path_factory.mktemp("p2")), "set", "target"))}


@pytest.mark.parametrize("name,max_set_size", [("cache", 8), ("cache", 4), ("target", 8)],
                         ids=["cached", "cached-split-sets", "renoised-refs"])
def test_each_subject_gets_the_images_of_its_own_call(pipes, name, max_set_size):
    pipe = pipes[name]
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        out = together(pipe, max_set_size=max_set_size)
        batched_calls = len(calls)
        singles = [alone(pipe, i, max_set_size=max_set_size) for i in range(len(SUBJECTS))]
    finally:
        handle.remove()
    assert [len(x) for x in out.images] == [3, 1, 2] and [len(r) for r in out.reference_images] == [2, 2, 2]
    for got, want in zip(out.images, singles):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
    steps = KW["num_inference_steps"] + (1 if name == "cache" else 0)  # + the references-only pass
    assert batched_calls == steps  # one denoiser call per step for all three subjects
    assert len(calls) == len(SUBJECTS) * steps + batched_calls


def test_subjects_do_not_leak_into_each_other(pipes):
    """Changing one subject's references changes its images only."""
    pipe = pipes["cache"]
    base = together(pipe).images
    swapped = list(SUBJECTS)
    try:
        SUBJECTS[1] = (subject_refs(2, 7), *SUBJECTS[1][1:])
        changed = together(pipe).images
    finally:
        SUBJECTS[:] = swapped
    torch.testing.assert_close(changed[0], base[0], atol=2e-4, rtol=0)
    torch.testing.assert_close(changed[2], base[2], atol=2e-4, rtol=0)
    assert (changed[1] - base[1]).abs().max() > 1e-3


def test_plan_gives_each_subject_its_own_sets():
    plan = SetPlan.build([3, 1, 2], 2, 2, 4)  # cap 2 targets per set: subject 0 -> two sets
    assert plan.set_owner.tolist() == [0, 0, 1, 2]
    refs = torch.arange(6.0)  # three subjects x two references
    flat = plan.stack(refs, torch.arange(100.0, 106.0)).view(plan.num_sets, -1)
    assert flat[:, :2].tolist() == [[0, 1], [0, 1], [2, 3], [4, 5]]
    assert plan.unstack(flat.flatten()).tolist() == [100.0, 101.0, 102.0, 103.0, 104.0, 105.0]


def test_bad_subject_batches(pipes):
    pipe = pipes["cache"]
    with pytest.raises(ValueError, match="same number of references.*group subjects"):
        pipe(reference_images=[subject_refs(1, 0), subject_refs(2, 1)], prompt=[["a"], ["b"]], **KW)
    with pytest.raises(ValueError, match="reference_images has 1 entries for 2 subjects"):
        pipe(reference_images=[subject_refs(1, 0)], prompt=[["a"], ["b"]], **KW)
    with pytest.raises(ValueError, match="generator has 1 entries for 2 subjects"):
        pipe(reference_images=[subject_refs(1, 0)] * 2, prompt=[["a"], ["b"]],
             generator=[torch.Generator()], **KW)


def test_mmdit_family_batches_subjects_too(tiny_flux_model_dir, tmp_path):
    """FLUX's joint text-image attention replays each set's own subject's cached references."""
    pipe = load(make_pipeline_dir(tiny_flux_model_dir, str(tmp_path / "flux"), "references", resolution=32))
    assert pipe.reference_cache_supported()
    out = together(pipe)
    for i, got in enumerate(out.images):
        torch.testing.assert_close(got, alone(pipe, i), atol=2e-4, rtol=0)


def test_a_subject_may_give_one_generator_per_image(pipes):
    """jedi-generate seeds every image: a subject's entry may be a list of generators, one per image."""
    pipe = pipes["cache"]
    refs, prompts, caps = SUBJECTS[0]

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    own = pipe(reference_images=refs, prompt=prompts, reference_captions=caps, generator=gens([5, 6, 7]), **KW).images
    out = pipe(reference_images=[refs, SUBJECTS[1][0]], prompt=[prompts, SUBJECTS[1][1]],
               reference_captions=[caps, SUBJECTS[1][2]], generator=[gens([5, 6, 7]), gens([8])], **KW).images
    torch.testing.assert_close(out[0], own, atol=2e-4, rtol=0)


def test_attention_maps_need_one_subject_per_call(pipes):
    with pytest.raises(ValueError, match="return_attention_maps takes one subject per call"):
        together(pipes["cache"], return_attention_maps=True)


def test_subjects_with_the_same_reference_files_encode_them_once(pipes, tmp_path, monkeypatch):
    """jedi-generate makes every image its own subject: a job's reference files are loaded and encoded once."""
    from PIL import Image

    pipe = pipes["cache"]
    files = []
    for i, arr in enumerate(subject_refs(2, 3)):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(arr).save(files[-1])
    encoded = []
    real = type(pipe).encode_references
    monkeypatch.setattr(type(pipe), "encode_references", lambda self, px: encoded.append(len(px)) or real(self, px))
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    out = pipe(reference_images=[files, list(files), files], prompt=[["a"], ["b"], ["c"]], generator=gens, **KW)
    assert encoded == [2] and [len(r) for r in out.reference_images] == [2, 2, 2]
    alone = pipe(reference_images=files, prompt=["b"], generator=torch.Generator().manual_seed(2), **KW).images
    torch.testing.assert_close(out.images[1], alone, atol=2e-4, rtol=0)
