"""EEP's search machinery (arXiv 2407.00945), split for readability; `moecompress.methods.eep` is the method.

* `space`      — layer groups, the routable kept-expert sets, candidate ↔ ExpertPlan
* `operators`  — initial population, parent sampling, discrete mutation, crossover + Gaussian mutation
* `population` — every evaluated candidate, persisted (safetensors + JSON) after every evaluation
* `apply`      — apply a candidate to the live model with surgery and restore the original tensors (no copies)
* `fitness`    — the default fitness: an lm-eval task metric on a chosen split
* `search`     — the two-phase loop, resumable, data-parallel under `accelerate launch`
"""
