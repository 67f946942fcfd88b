// Page frames on a virtual machine whose guest hands its free memory back to the host (free page
// reporting through virtio-balloon, as Firecracker-style micro-VMs run it). A frame the guest uses
// again after it was reported costs a fault on the host and a zeroed page, and that time shows up as
// the guest's system time in whatever first writes the frame: here, the page-cache writes of a fill.
// Measured with dd on the machine the benchmarks run on: writing 1 GiB of new page-cache pages took
// 0.22 s of system time right after other pages were freed, and 2.6-2.7 s when the frames had gone
// back to the host. A bare-metal node, or a VM without free page reporting, pays the first.
//
// Freed memory is reported at once here, so the cost cannot be controlled from a benchmark: writing
// and removing a scratch file before the pulls (tried) freed frames that were then reported during
// the pulls. The benchmarks report instead how much memory the guest handed back while they measured,
// beside their CPU figures, so that a reader can tell this machine's effect from a regression.

import { readFileSync } from 'node:fs';

const REPORTED_KIB = '/sys/module/page_reporting/parameters/reported_kib';
/** KiB the guest has reported free to its host since boot; undefined where the kernel does not report. */
export function reportedKib(): number | undefined {
  try {
    const value = Number(readFileSync(REPORTED_KIB, 'utf8').trim());
    return Number.isFinite(value) ? value : undefined;
  } catch {
    return undefined;
  }
}
