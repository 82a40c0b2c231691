"""Deliberately naive per-sample references for the objectives (python loops, math module)."""

import math


def itc_naive(img, txt, img_keys, txt_keys, idx, idx_keys, temp, alpha=0.0, img_m=None, txt_m=None):
    """Symmetric ITC loss with per-row loops; inputs are nested python lists."""

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    def softmax(row):
        m = max(row)
        e = [math.exp(v - m) for v in row]
        s = sum(e)
        return [v / s for v in e]

    def side(q, keys, qm):
        total = 0.0
        for i in range(len(q)):
            logits = [dot(q[i], k) / temp for k in keys]
            p = softmax(logits)
            pos = [1.0 if idx_keys[j] == idx[i] else 0.0 for j in range(len(keys))]
            hard = [v / sum(pos) for v in pos]
            if alpha > 0:
                soft = softmax([dot(qm[i], k) / temp for k in keys])
                tgt = [alpha * s + (1 - alpha) * h for s, h in zip(soft, hard)]
            else:
                tgt = hard
            total += -sum(t * math.log(pj) for t, pj in zip(tgt, p))
        return total / len(q)

    return (side(img, txt_keys, img_m) + side(txt, img_keys, txt_m)) / 2


def kl_naive(student, teacher, T):
    out = 0.0
    for s, t in zip(student, teacher):
        ps = [math.exp(v / T) for v in s]
        pt = [math.exp(v / T) for v in t]
        zs, zt = sum(ps), sum(pt)
        out += sum((b / zt) * math.log((b / zt) / (a / zs)) for a, b in zip(ps, pt))
    return out / len(student) * T * T
