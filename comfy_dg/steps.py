"""Which model evaluations are the first of their sampler step.

The official DG code guides only the first (Euler) evaluation of each Heun step. ComfyUI does not tell a
model patch which evaluation of a step it is in, but every k-diffusion sampler in ComfyUI calls its progress
callback right after the first evaluation of step i. So after callback i, a sampler runs a known number
of intermediate evaluations of step i (0 for one-evaluation samplers, 1 for heun, dpm_2, ...) before the
first evaluation of step i+1. The table below gives that number per sampler, as a function of i and the
σ schedule; each run checks it against the callbacks and falls back to "every evaluation" with a warning
when the sampler does something else.

A sampler missing from the table (a newer ComfyUI's, or a custom one) is measured instead: the evaluations
between its callbacks 0 and 1 are one step's intermediates plus the next step's first, so that interval gives
its evaluations per step. Until then every evaluation is guided (the first step cannot be told apart); every
later step is checked against the measured count, and a sampler whose count changes from step to step falls
back to "every evaluation" with a warning.
"""
import logging

log = logging.getLogger("comfy_dg")


def _one_unless_last(i, sigmas):
    return 0 if float(sigmas[i + 1]) == 0.0 else 1


def _heunpp2(i, sigmas):
    end = float(sigmas[-1])
    if float(sigmas[i + 1]) == end:
        return 0
    return 1 if float(sigmas[i + 2]) == end else 2


# Intermediate evaluations after callback i, by sampler function name. Absent names are measured at run time
# (one-evaluation samplers need no entry).
INTERMEDIATE_EVALUATIONS = {
    "sample_heun": _one_unless_last,
    "sample_exp_heun_2_x0": _one_unless_last,           # seeds_2 with r = 1 (ComfyUI 0.3x)
    "sample_exp_heun_2_x0_sde": _one_unless_last,
    "sample_heunpp2": _heunpp2,
    "sample_dpm_2": _one_unless_last,
    "sample_dpm_2_ancestral": _one_unless_last,
    "sample_dpm_2_ancestral_RF": _one_unless_last,
    "sample_dpmpp_2s_ancestral": _one_unless_last,
    "sample_dpmpp_2s_ancestral_RF": _one_unless_last,
    "sample_dpmpp_2s_ancestral_cfg_pp": _one_unless_last,
    "sample_dpmpp_sde": _one_unless_last,
    "sample_dpmpp_sde_gpu": _one_unless_last,
    "sample_seeds_2": _one_unless_last,
    "sample_seeds_3": lambda i, sigmas: 0 if float(sigmas[i + 1]) == 0.0 else 2,
    "sample_sa_solver_pece": lambda i, sigmas: 0 if i == 0 else 1,
    "sample_dg_heun_boosted": _one_unless_last,      # the pack's own (comfy_dg/sampling.py)
}

# The pack's samplers that say themselves which evaluation is which (patch.Run.first_evaluation, set before each
# model call): the rejection sampler's samples move at their own pace, so its callbacks cannot number steps.
DECLARE_THEIR_EVALUATIONS = {"sample_dg_rejection"}

# Samplers whose evaluations do not follow the σ schedule (DPM-Solver's adaptive and fast variants pick
# their own points): there is no "first evaluation of a step" to find, so DG is applied at every one.
CANNOT_TELL = {"dpm_fast_function", "dpm_adaptive_function", "sample_dpm_fast", "sample_dpm_adaptive"}


def sampler_name(sampler) -> str:
    fn = getattr(sampler, "sampler_function", None)
    return getattr(fn, "__name__", None) or type(sampler).__name__


class StepTracker:
    """Follows one sampling run: on_evaluation() says whether to guide, on_callback(i) checks the count."""

    def __init__(self, name: str, sigmas):
        self.name = name
        self.sigmas = [float(s) for s in sigmas]
        self.intermediate = INTERMEDIATE_EVALUATIONS.get(name)      # None: measured between callbacks 0 and 1
        self.every_evaluation = False
        self.to_skip = 0
        self.evaluations = 0            # since the last callback (or the start)
        self.firsts_since_callback = 0
        self.last_was_first = False
        self.callbacks = 0
        if name in CANNOT_TELL:
            self._give_up("its evaluation points do not follow the step schedule")

    def _give_up(self, why: str):
        self.every_evaluation = True
        log.warning("comfy-dg: the intermediate weight needs each step's evaluations, but comfy-dg cannot tell the "
                    "steps of sampler %s (%s); the weight w is applied at every model evaluation of this run.",
                    self.name, why)

    def peek(self) -> bool:
        """What on_evaluation() will say for the coming evaluation, without counting it."""
        return self.every_evaluation or self.to_skip == 0

    def on_evaluation(self) -> bool:
        if self.every_evaluation:
            return True
        self.evaluations += 1
        if self.to_skip > 0:
            self.to_skip -= 1
            self.last_was_first = False
            return False
        self.firsts_since_callback += 1
        self.last_was_first = True
        return True

    def on_callback(self, i: int):
        if self.every_evaluation:
            return
        self.callbacks += 1
        if i != self.callbacks - 1:
            self._give_up(f"its callback numbers steps {self.callbacks - 1} as {i}")
            return
        # Every sampler calls back right after the first evaluation of step i.
        if self.intermediate is None and i == 1 and self.evaluations >= 1:
            per_step = self.evaluations
            self.intermediate = lambda _i, _sigmas: per_step - 1
            if per_step > 1:
                log.info("comfy-dg: sampler %s is not in comfy-dg's table; its callbacks show %d model evaluations "
                         "per step. Its first step got the weight w at every evaluation, every later step at its "
                         "first only (the intermediate weight at the others).", self.name, per_step)
        elif self.to_skip or not self.last_was_first or self.firsts_since_callback != 1:
            if i == 0:
                why = f"it evaluated the model {self.evaluations} times before its first callback"
            elif self.name in INTERMEDIATE_EVALUATIONS:
                why = f"step {i - 1} took another number of model evaluations than comfy-dg's table says"
            else:
                why = f"step {i - 1} took another number of model evaluations than its step 0 did"
            self._give_up(why)
            return
        self.evaluations = self.firsts_since_callback = 0
        self.last_was_first = False
        if self.intermediate is not None and i + 1 < len(self.sigmas):
            self.to_skip = self.intermediate(i, self.sigmas)

    def finish(self):
        """After the run: a sampler that evaluated the model more than once and never called back could not be
        followed (every evaluation was guided); say so."""
        if not self.every_evaluation and self.callbacks == 0 and self.evaluations > 1:
            self._give_up("it never called its progress callback")
