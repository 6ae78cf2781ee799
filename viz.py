"""viz.py: the self-influence reports of a run store. This file holds the command line and the report of
the with/without experiment; the factorial report is in viz_factorial.py, the scan's in viz_scan.py.

Claim under test: adding an easy training example makes the retrained net *less* confident on it
(negative self-influence), adding a random one makes it more confident. Self-influence of example i =
mean margin over `with` runs - mean margin over `without` runs, tested per example with Welch's t-test.

    python viz.py                          # runs/airbench, Welch t-test, p < 0.01, 50 controls per example
    python viz.py --trainer madry          # runs/madry
    python viz.py runs/whatever --test z   # the original's normal p-value
    python viz.py --all --csv si.csv --json si.json --plot si.png
    python viz.py --controls 0             # no controls: exactly the report printed before controls existed
    python viz.py runs/digits-factorial    # a factorial store (arms a, b): the factorial report
    python viz.py --scan                   # runs/airbench-scan: every example's self-influence

Which report: the store's arms decide. `with`/`without`: this report. `a`/`b` (a trainer's --design
factorial): the factorial report, which separates self-influence from cross-influence by construction
(see viz_factorial.py). `scan`: pass --scan (it also changes the default folder to runs/<trainer>-scan).

With/without output: first the original's table, in its published layout (significant examples only,
per group, with the selection-biased average of the listed ones); then what an honest reading needs: the
mean over all examples of each group with its 95% CI, counts of significant positive/negative examples,
the paired test on seed-matched runs, and the runs per arm each example needs. Everything up to here is
printed exactly as before controls were added (tests/golden/viz_default.txt). Then the controls: removing
all held-out examples at once can move every example, not only the removed ones (cross-influence). For
each held-out example, --controls K (default 50) training examples never held out, with its label and the
nearest mean margin over both arms: both arms train on them, so their shift (the control shift) is what
the removal does to an example like it. The control shift is read at the example's own mean margin from
the line through its controls (viz_controls.py), so controls sitting below an example at the top of its
class do not lean it; the report gives each group's mean margin gap to its controls. Control-adjusted
self-influence = shift - control shift, tested on the per-run difference example - control value
(paired by seed; Welch when no runs are seed-matched), per group and per example. --all lists every held-out example with its CI, Holm and Benjamini-Hochberg adjusted p-values
(over all held-out examples), raw and control-adjusted.

Cost: without controls, reads only the held-out columns of the memory-mapped (runs, n_train, 10) float16
arrays: on 2 arms x 1000 runs x 50000 examples (2 GB, page cache warm, 2-core VM) 0.16 s and 116 MB
peak resident memory, ~100 MB of it numpy and scipy; loading every run into RAM instead took 86 s and
14 GB (python bench/bench_viz.py). Controls add one streamed pass over every column of each arm (the
mean margin of every example, CHUNK runs in memory at a time) and the controls' columns of both arms: on
2 arms x 20 runs x 50000 examples, 1.07 s and 245 MB peak with 50 controls against 0.04 s and 107 MB
without (python bench/bench_viz_reports.py --runs 20, shared 2-core VM). The pass over `with` alone took
17 ms per run at 100 runs; over both arms, expect about 35 s at 1000 runs per arm. --controls 0 skips it.

Published result (airbench, 1000 runs per arm): random 10 of 20 significant, average +0.467; easy 13 of
20 significant, all negative, average -0.269. How much of that is self-influence was not measured then:
the with/without design cannot tell without the controls.

Runs with a non-finite logit at a held-out example (a diverged net) are left out of every statistic,
and the report says which runs and examples. Notes about the store go to stderr, the report to stdout.
"""
import argparse
import sys

import viz_controls
import viz_factorial
import viz_scan
import viz_with_without
from store import Store, StoreError
from viz_io import write_csv, write_json, write_plot


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('store', nargs='?', help='store folder (default: runs/<trainer>, runs/<trainer>-scan with --scan)')
    parser.add_argument('--trainer', default='airbench', help='reads runs/<trainer> when no store is given')
    parser.add_argument('--test', choices=('welch', 'z'), default='welch',
                        help="welch: Welch's t-test; z: the original's normal p-value")
    parser.add_argument('--alpha', type=float, default=0.01,
                        help='significance threshold of the tables (with --scan: of BH p)')
    parser.add_argument('--all', action='store_true', help='also list every held-out example with its CI '
                                                           '(factorial: and every cross-influence passing BH)')
    parser.add_argument('--csv', metavar='FILE', help='write per-example statistics as CSV')
    parser.add_argument('--json', metavar='FILE', help='write per-example statistics and group summaries as JSON')
    parser.add_argument('--plot', metavar='FILE.png', help='write a forest plot of self-influence with CIs')
    parser.add_argument('--controls', type=int, metavar='K',
                        help=f'controls per held-out example (default {viz_controls.CONTROLS}; 0: none, and no pass '
                             'over all examples)')
    parser.add_argument('--scan', action='store_true',
                        help='report a scan store (trainer --scan): the self-influence of every training example')
    parser.add_argument('--top', type=int, help='with --scan: examples per list (default 20); factorial store: '
                                                 'cross-influences listed (default 10)')
    return parser


def check_flags(parser, args):
    """Flags out of range or outside the scan report: argparse's usage error (exit 2). Fills in --controls."""
    if not 0 < args.alpha < 1:
        parser.error(f'--alpha {args.alpha}: expected a probability between 0 and 1, e.g. 0.01')
    if args.scan and (args.all or args.plot or args.test != 'welch' or args.controls is not None):
        parser.error('--all, --plot, --controls and --test z belong to the with/without and factorial reports; '
                     'with --scan use --top, --alpha, --csv and --json')
    if args.controls is not None and args.controls < 0:
        parser.error(f'--controls {args.controls}: expected a number of controls per example, 0 or more')
    if args.controls is None:
        args.controls = viz_controls.CONTROLS
    if args.top is not None and args.top < 1:
        parser.error(f'--top {args.top}: expected a number of examples, 1 or more')


def report(parser, args, store):
    """The report the store's arms call for (--scan: the scan's), refusing the flags that do not belong to
    it. -> (its module, its result, its printed lines)."""
    if args.scan:
        res = viz_scan.analyse(store, args.alpha, args.top or viz_scan.TOP)
        return viz_scan, res, viz_scan.lines(res, args.top or viz_scan.TOP)
    if viz_factorial.is_factorial(store):
        if args.test != 'welch':
            parser.error('--test z belongs to the with/without report; the factorial report uses paired t-tests')
        res = viz_factorial.analyse(store, args.alpha, args.controls)
        return viz_factorial, res, viz_factorial.lines(res, args.top or viz_factorial.TOP, args.all)
    if args.top is not None:
        parser.error('--top belongs to the scan (--scan) and factorial reports; the with/without report '
                     'lists every held-out example (--all)')
    res = viz_with_without.analyse(store, args.test, args.alpha, args.controls)
    return viz_with_without, res, viz_with_without.lines(res, args.all)


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args)
    path = args.store or (f'runs/{args.trainer}-scan' if args.scan else f'runs/{args.trainer}')
    try:
        module, res, lines = report(parser, args, Store(path))
    except StoreError as e:
        sys.exit(f'viz: {e}')
    print('\n'.join(lines))
    outputs = ((args.csv, lambda out: write_csv(res, out, module.COLUMNS)),
               (args.json, lambda out: write_json(res, out, module.json_doc(res), module.COLUMNS)),
               (args.plot, lambda out: write_plot(res, out, *module.plot_labels(res))))
    for out, write in outputs:
        if out:
            try:
                write(out)
            except OSError as e:
                sys.exit(f'viz: could not write {out} ({e}); the report above is complete. '
                         'Pass a path in a writable folder.')
    return res


if __name__ == '__main__':
    main()
