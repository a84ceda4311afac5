"""What a user does with a GGUF file, run on one mutant: the outcome is success or an ImpError, nothing else.

Shared by tests/test_fuzz_load.py (in process, 1,000+ cases) and benchmarks/fuzz.py (a worker pool, 20,000).
Every file goes through what ``imp_jax.load`` checks before it plans: open, config, tokenizer, parameter specs
(every tensor's name, shape and type), then the chat template is rendered and the prompt tokenized and decoded.
A small file also has its weights loaded (``load_params``), each leaf compared with the planned one (nothing put
on the device that the plan did not count), and becomes a ``Model``. The memory plan itself (two XLA compiles per
new config, seconds each) is left out: a mutant that changes a norm epsilon would spend all the time compiling.
A big file (the registry models) stops before its weights, which a mutant never touches (tests/mutants.py leaves
them a sparse hole).
"""

from __future__ import annotations

import dataclasses
import signal
import time
from pathlib import Path

import jax

from imp_jax import registry
from imp_jax.errors import ImpError
from imp_jax.gguf import open_gguf
from imp_jax.model import Model
from imp_jax.models.config import config_from_gguf
from imp_jax.text.chat import ChatTemplate
from imp_jax.text.tokenizer import Tokenizer
from imp_jax.weights.loading import abstract_params, load_params
from imp_jax.weights.specs import param_specs
from tests.mutants import Base
from tests.tiny_gguf import write_tiny_llama

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "The rain in Spain, 1234 <|im_end|> caf\u00e9 \U0001f600"},
]
MAX_CONTEXT = 32
# Cases per base in a CI run: the tiny fixtures cost ~0.03 s a case, smollm2 ~0.3 s, the two 150k-260k-token
# vocabularies ~1.3 s (parsing and building the vocabulary), so they get fewer; 1,000 in all.
CI_COUNTS = {"tiny-spm": 380, "tiny-bpe": 380, "smollm2-135m": 160, "qwen2.5-0.5b": 40, "gemma3-270m": 40}


def open_bases(folder: Path, labels: tuple[str, ...] = tuple(CI_COUNTS)) -> list[Base]:
    """The fuzz's good files: the two tiny fixtures (written into ``folder``) and the registry models."""
    out = []
    for label in labels:
        if label.startswith("tiny-"):
            vocab = label.removeprefix("tiny-")
            out.append(Base.open(write_tiny_llama(folder / f"{label}.gguf", vocab=vocab), label))
        else:
            out.append(Base.open(registry.resolve(label, progress=False), label))
    return out


class CaseTimeout(BaseException):
    """Raised by the alarm inside a case that ran past its limit (BaseException: no ``except Exception`` in the
    code under test can swallow it)."""


@dataclasses.dataclass(frozen=True)
class Outcome:
    """``kind``: "ok", the ImpError subclass's name, "timeout", "over_plan" or "escape" (anything else); ``detail``: the
    message; ``seconds``: how long the case took."""

    kind: str
    detail: str
    seconds: float

    @property
    def bad(self) -> bool:
        return self.kind in ("escape", "timeout", "over_plan")


class OverPlan(Exception):
    """Loading put on the device a leaf whose shape or dtype the plan (the parameter specs) did not give."""


def use(path: Path, *, small: bool) -> None:
    mf = open_gguf(path)
    config = config_from_gguf(mf.metadata, mf.tensors)
    tokenizer = Tokenizer.from_metadata(mf.metadata, mf.path)
    specs = param_specs(mf, config, "float32")
    if small:
        params = load_params(mf, config, specs)
        planned = jax.tree.leaves(abstract_params(specs))
        placed = jax.tree.leaves(params)
        if [(a.shape, a.dtype) for a in planned] != [(a.shape, a.dtype) for a in placed]:
            raise OverPlan("the loaded weights differ from the planned leaves")
        text = Model(mf, config, params, tokenizer, dtype="float32", max_context=MAX_CONTEXT, batch=1).chat_template(
            MESSAGES
        )
    else:
        text = ChatTemplate.from_metadata(mf.metadata, tokenizer).render(MESSAGES)
    tokenizer.decode(tokenizer.encode(text))


def run_case(path: Path, *, small: bool, limit_s: float) -> Outcome:
    """Use the file as a user would; a case past ``limit_s`` is stopped by SIGALRM (main thread only)."""

    def alarm(signum, frame):
        signal.setitimer(signal.ITIMER_REAL, 0.5)  # again soon, should this one land where it is ignored (a gc hook)
        raise CaseTimeout()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    t0 = time.perf_counter()
    try:
        use(path, small=small)
        kind, detail = "ok", ""
    except ImpError as e:
        kind, detail = type(e).__name__, str(e)
    except CaseTimeout:
        kind, detail = "timeout", f"stopped after {limit_s:g} s"
    except OverPlan as e:
        kind, detail = "over_plan", str(e)
    except Exception as e:  # what the fuzz exists to find: recorded, never hidden
        kind, detail = "escape", f"{type(e).__name__}: {e}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return Outcome(kind, detail[:400], time.perf_counter() - t0)
