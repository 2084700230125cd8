"""jedi-generate's two measured claims on a trained pipeline (jedi_train/generate/measure.py): the gate raises
identity (--best-of 4 vs the first try, threshold = the first tries' median) and joint sets are more
consistent (a job's 4 images as one set vs 4 independent images, same references and seeds).

Jobs: held-out procedural subjects of the demo's world (jedi_train/eval/procedural.make_cases: seeds no training
shard uses), 1 reference render each, 4 prompts naming other scenes; identity = the procedural colour identity
(no extractor needed). Pipeline: $JEDI_PIPELINE, else the newest runs/demo-*/pipeline; none: skipped (the
figures only mean something for a trained model).
"""
import glob
import json
import os
import tempfile

from PIL import Image

SUBJECTS, PROMPTS = 12, 4


def jobs_file(tmp: str, resolution: int, layout: str) -> str:
    from jedi_train.eval import procedural as ev

    cases = ev.make_cases(SUBJECTS, 1, PROMPTS, 1, resolution, layout)
    path = os.path.join(tmp, "jobs.jsonl")
    with open(path, "w") as f:
        for c in cases:
            ref = os.path.join(tmp, "refs", f"{c.index:04d}.png")
            os.makedirs(os.path.dirname(ref), exist_ok=True)
            Image.fromarray(c.refs[0]).save(ref)
            f.write(json.dumps({"id": f"s{c.index:04d}", "references": [ref],
                                "prompts": [c.prompt(sc) for sc in c.target_scenes], "seed": 0}) + "\n")
    return path


def main():
    from jedi_train.eval.procedural import run_layout
    from jedi_train.generate.measure import gate_effect, joint_consistency
    from jedi_train.sampling import load_pipeline

    found = os.environ.get("JEDI_PIPELINE") or next(iter(sorted(glob.glob("runs/demo-*/pipeline"))[::-1]), None)
    if not found:
        print("no trained pipeline (runs/demo-*/pipeline or $JEDI_PIPELINE): run make train first; skipped")
        return None
    resolution = load_pipeline(found, "cpu", progress=False).resolution
    with tempfile.TemporaryDirectory() as tmp:
        path = jobs_file(tmp, resolution, run_layout(found))
        gate = gate_effect(found, path, os.path.join(tmp, "gate"), best_of=4)
        joint = joint_consistency(found, path, os.path.join(tmp, "joint"))
    print(f"pipeline {found}; {SUBJECTS} held-out procedural subjects x {PROMPTS} prompts, 1 reference, "
          f"the export's sampling settings; identity = procedural colour identity; 95% bootstrap CIs over subjects")
    k = gate["kept_minus_first"]
    print(f"  gate (best of 4, threshold {gate['min_identity']:.3f} = median first try): first try "
          f"{gate['first_try']:.3f}, kept {gate['kept']:.3f}, kept - first {k['mean']:+.3f} "
          f"({k['ci'][0]:+.3f}, {k['ci'][1]:+.3f}); pass rate {gate['pass_first_try']:.2f} -> {gate['pass_kept']:.2f}; "
          f"{gate['candidates_per_image']:.2f} candidates per image")
    j = joint["joint_minus_independent"]
    print(f"  joint sets: mean pairwise identity {joint['joint']:.4f} joint vs {joint['independent']:.4f} "
          f"independent; joint - independent {j['mean']:+.4f} ({j['ci'][0]:+.4f}, {j['ci'][1]:+.4f})")
    return gate, joint


if __name__ == "__main__":
    main()
