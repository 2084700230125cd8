"""jedi-generate's library: jobs files (jobs.py), the quality gate (gate.py), the run loop (run.py), results.csv
and report.html (report.py), and the measurements of the gate and of joint sets (measure.py). Sampling goes
through jedi_train/sampling.py, scores through jedi_train/eval/ (the metrics jedi-eval reports)."""
