"""Guided DDIM of a ddpm-cfg teacher against LCM (and LCF) on cifar10-latent: FD of decoded images and accuracy.

    python scripts/latent_lcm_table.py TEACHER.pt LCM.pt [N]     # DDIM 50/20/8/4/2/1 and LCM 1/2/4 at w = 0, 1, 3
    python scripts/latent_lcm_table.py --lcf LCF.pt LCM.pt [N]   # LCM before / LCF after on the LCF's classes

How the README's cpu numbers were made (one torch thread, the shared 2-core machine):

    AE=runs/checkpoints/autoencoder_cpu_<hash>.pt    # the cifar10-latent cpu default, trained on first use
    fewstep train --method ddpm-cfg --data cifar10-latent --profile cpu --set autoencoder=$AE --out t.pt
    fewstep train --method lcm --data cifar10-latent --profile cpu --set autoencoder=$AE --teacher t.pt --out lcm.pt
    # LCF: teacher and LCM on 8 classes, LCF on ship and truck, one autoencoder for all
    OLD='["airplane","automobile","bird","cat","deer","dog","frog","horse"]'; NEW='["ship","truck"]'
    fewstep train --method ddpm-cfg ... --set "classes=$OLD" --out t8.pt; fewstep train --method lcm ... --out lcm8.pt
    fewstep train --method lcf --data cifar10-latent --profile cpu --set autoencoder=$AE --set "classes=$NEW" \
        --set init=lcm8.pt --out lcf2.pt

No paper: a measurement.
"""
import sys
import time

import torch

torch.set_num_threads(1)
from fewstep_lab.guidance import CFGDenoiser  # noqa: E402
from fewstep_lab.pipeline import default_sigmas, load_run, make_domain  # noqa: E402

args = sys.argv[1:]


def show(name, r):
    acc = "" if r.accuracy is None else f"  acc {r.accuracy:.3f}"
    print(f"{name:<28} NFE {r.nfe:>4.0f}  FD {r.fd_mean:8.3f}{acc}  {1000 * r.seconds_per_image:.2f} ms/img", flush=True)


if args[0] == "--lcf":  # LCF.pt LCM8.pt [N]: FD on the 2 new classes before (the LCM) and after LCF
    f, f_run = load_run(args[1])
    m, m_run = load_run(args[2])
    n = int(args[3]) if len(args) > 3 else 1000
    dom = make_domain(f_run)  # the new classes' data and reference
    print("floor (training vs test images of the new classes):", dom.floor(min(n, len(dom.images))))
    labels = dom.balanced_labels(n)
    null = torch.full((n,), 10)
    for cond_name, c in (("labels", labels), ("no label", null)):
        for w in (0.0, 3.0):
            for steps in (1, 2, 4):
                show(f"LCM (8 cl.) {cond_name} w={w:g} {steps}st", dom.evaluate(
                    m, "lcm", default_sigmas(m_run, steps), n=n, cond=(c, w)))
                show(f"LCF {cond_name} w={w:g} {steps}st", dom.evaluate(
                    f, "lcm", default_sigmas(f_run, steps), n=n, cond=(c, w)))
    sys.exit()

t, t_run = load_run(args[0])
l, l_run = load_run(args[1])
n = int(args[2]) if len(args) > 2 else 1000
dom = make_domain(t_run)
print("floor (training vs test images):", dom.floor(n))
labels = dom.balanced_labels(n)
null = t.net.num_classes
for w in (0.0, 1.0, 3.0):
    # w = 0 is the conditional model itself (one evaluation a step); w > 0 evaluates c and the null label (2 a step).
    D = t if w == 0 else CFGDenoiser(t, w, null)
    for steps in (50, 20, 8, 4, 2, 1):
        t0 = time.time()
        r = dom.evaluate(D, "euler", default_sigmas(t_run, steps), n=n, cond=labels)
        show(f"DDIM w={w:g} {steps} steps (x{1 if w == 0 else 2} NFE)", r)
    for steps in (1, 2, 4):
        show(f"LCM w={w:g} {steps} steps", dom.evaluate(l, "lcm", default_sigmas(l_run, steps), n=n,
                                                       cond=(labels, w)))
