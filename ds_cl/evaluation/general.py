"""General ability through lm-evaluation-harness (`lm_eval.simple_evaluate` on the HF checkpoint).

lm-eval is not a dependency of ds-cl (it is heavy); install it with `pip install lm-eval` where
you want general-ability scores. Task data come from the Hugging Face hub or its local cache:
offline, pre-download on a connected machine and set `HF_DATASETS_OFFLINE=1`, or give lm-eval
task YAMLs that read local files (`include_path` in the suite; e.g. `dataset_path: json` with
`dataset_kwargs: {data_files: {test: FILE}}`), which need no hub at all.
"""

from __future__ import annotations

from .io import EvalInputError

_DATA_ERRORS = ("ConnectionError", "DatasetNotFoundError", "LocalEntryNotFoundError", "OfflineModeIsEnabled",
                "HfHubHTTPError", "FileNotFoundError", "DataFilesNotFoundError", "EmptyDatasetError")


_MANAGERS: dict = {}   # include_path -> TaskManager: indexing lm-eval's task YAMLs takes seconds; do it once


def _task_manager(include_path):
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalInputError("general ability (suite key lm_eval) needs lm-evaluation-harness: "
                             "pip install lm-eval") from None
    paths = include_path if isinstance(include_path, (list, tuple)) else [include_path] if include_path else []
    key = tuple(str(p) for p in paths)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=list(key)) if key else TaskManager()
    return _MANAGERS[key]


def check_tasks(spec: dict):
    """Fail before any model is loaded: lm-eval missing or task names unknown."""
    tm = _task_manager(spec.get("include_path"))
    tasks = list(spec["tasks"])
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise EvalInputError(f"unknown lm-eval task(s) {unknown}; see `lm-eval ls tasks` (or add include_path)")
    return tm


def run_lm_eval(model_path: str, spec: dict, device: str = "cpu", dtype: str = "auto") -> dict:
    """The `general.json` payload: lm-eval's `results` (per task: metric -> value) and its config."""
    import lm_eval

    tm = check_tasks(spec)
    tasks = list(spec["tasks"])
    try:
        res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_path},dtype={dtype}",
                                      tasks=tasks, num_fewshot=spec.get("num_fewshot"),
                                      batch_size=spec.get("batch_size", 1), device=device,
                                      limit=spec.get("limit"), task_manager=tm, log_samples=False)
    except Exception as e:  # map the hub/data failures to a message that says what to do
        if type(e).__name__ in _DATA_ERRORS or "huggingface.co" in str(e) or "offline" in str(e).lower():
            raise EvalInputError(
                f"lm-eval task data for {tasks} is not available here ({type(e).__name__}: {str(e)[:160]}); "
                "pre-download it into the HF datasets cache and set HF_DATASETS_OFFLINE=1, or point "
                "include_path at task YAMLs that read local files") from None
        raise
    return {"results": res.get("results", {}), "tasks": tasks, "limit": spec.get("limit"),
            "num_fewshot": spec.get("num_fewshot"), "lm_eval_version": getattr(lm_eval, "__version__", None)}
