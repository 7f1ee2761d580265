#!/usr/bin/env python3
"""What the benchmark scripts wait on, with a deadline.

  wait-metric.py --metric PREFIX --count N --out FILE ADDR...
      Samples the services' /metrics at ADDR... every 50 ms until the
      counters named PREFIX (every label set, every address) add up to N;
      writes to FILE when the first and the N-th were seen, the rate
      between them and the last sample.
  wait-metric.py --gateway URL --skus A,B,...
      Waits until the purchases of those skus queued at the gateway (let in,
      not yet seen by a shop-worker) stop growing; prints how many.
"""
import argparse
import json
import sys
import time
import urllib.request


def metrics(addrs):
    total = {}
    for addr in addrs:
        text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                total[name] = total.get(name, 0.0) + float(value)
    return total


def count(sample, prefix):
    return sum(v for k, v in sample.items() if k.split("{")[0] == prefix)


def wait_metric(args):
    first = last = None
    deadline = time.time() + args.timeout
    while True:
        try:
            sample = metrics(args.addrs)
        except OSError:
            # Not listening yet: a service just started.
            if time.time() > deadline:
                raise
            time.sleep(0.05)
            continue
        done = count(sample, args.metric)
        now = time.time()
        if first is None and done >= 1:
            first = (now, done)
        if done >= args.count:
            last = (now, done)
            break
        if now > deadline:
            sys.exit(f"{args.metric}: only {done:.0f} of {args.count} in {args.timeout} s")
        time.sleep(0.05)
    (t0, d0), (t1, d1) = first, last
    rate = (d1 - d0) / (t1 - t0) if t1 > t0 else float("nan")
    json.dump({"first": first, "last": last, "per_second": rate, "metrics": sample},
              open(args.out, "w"))


def wait_queued(args):
    """Until the purchases queued stop growing for 3 s; prints how many.
    Fewer than sent when the crowd's draw gave a sku more buyers than
    units: those were turned away, not queued."""
    deadline = time.time() + args.timeout
    last, since = -1, time.time()
    while True:
        queued = 0
        for sku in args.skus.split(","):
            url = f"{args.gateway}/v1/skus/{sku}"
            queued += json.load(urllib.request.urlopen(url, timeout=5)).get("queued", 0)
        now = time.time()
        if queued != last:
            last, since = queued, now
        elif queued > 0 and now - since >= 3:
            print(queued)
            return
        if now > deadline:
            sys.exit(f"the queued purchases never settled in {args.timeout} s (last {queued})")
        time.sleep(0.5)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metric")
    parser.add_argument("--count", type=int)
    parser.add_argument("--out")
    parser.add_argument("--gateway")
    parser.add_argument("--skus")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("addrs", nargs="*")
    args = parser.parse_args()
    if args.metric:
        wait_metric(args)
    else:
        wait_queued(args)


if __name__ == "__main__":
    main()
