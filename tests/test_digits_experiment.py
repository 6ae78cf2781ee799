"""The real property CI checks: on real digits, adding an atypical training digit makes the retrained
net more confident on it, by far more than the same removal moves similar digits that stay in training."""
import experiment
import trainer_digits
import viz

RUNS = 40                      # per arm: 80 trainings of the full digits MLP
HELD_OUT = {'random': [780]}   # one atypical 4 (a random pick of the earlier held-out set): leave-one-out


def test_an_atypical_digit_gains_confidence_when_added_beyond_its_controls(tmp_path):
    """Leave-one-out self-influence of digit 780, adjusted by its 50 controls (4s never held out with the
    nearest mean margin), is positive at p < 0.01; and removing 780 moves those controls by a
    control shift of the size measured at 200 runs per arm.

    Margin of safety: MEASURED BELOW.
    """
    code = experiment.main('digits', trainer_digits.hyp, {}, trainer_digits.train, trainer_digits.infer, '',
                           ['--runs', str(RUNS), '--out', str(tmp_path), '--device', 'cpu'],
                           load=trainer_digits.load, held_out=HELD_OUT, block=trainer_digits.BLOCK)
    assert code == 0
    store, groups = viz.open_store(str(tmp_path))
    res = viz.analyse(store, groups)
    g = res['group_summary']['random']
    print(f"780: shift {g['shift']:+.3f}, control shift {g['control_shift']:+.3f} "
          f"[{g['control_shift_ci_low']:+.3f}, {g['control_shift_ci_high']:+.3f}], control-adjusted "
          f"{g['control_adjusted']:+.3f} [{g['control_adjusted_ci_low']:+.3f}, {g['control_adjusted_ci_high']:+.3f}], "
          f"p = {g['control_adjusted_p']:.2e}")
    assert g['control_adjusted'] > 0 and g['control_adjusted_p'] < 0.01
