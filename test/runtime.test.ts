// The supported Node.js runtime: the suite runs on the Node it was asked to run on (CI runs it on the
// machine's Node and on the LTS, see .ci/run), and the places that name the runtime agree: the
// Dockerfile's line, the LTS scripts/lts-node.sh fetches, package.json `engines` and @types/node.

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';

const read = (path: string) => readFileSync(new URL(`../../${path}`, import.meta.url), 'utf8');
const pkg = JSON.parse(read('package.json')) as { engines: { node: string }; devDependencies: Record<string, string> };
/** The majors an `engines` range of the form `^22.0.0 || ^24.0.0 || ^26.0.0` admits. */
const engineMajors = pkg.engines.node.split('||').map((part) => Number(/^\s*\^(\d+)\.\d+\.\d+\s*$/.exec(part)?.[1]));

describe(`the runtime: Node.js ${process.version}`, () => {
  it('is the Node.js the run asked for in PULLBRIDGE_EXPECT_NODE, in this process and in the processes tests start', function () {
    const expected = process.env.PULLBRIDGE_EXPECT_NODE;
    if (!expected) this.skip();
    assert.equal(process.version, expected);
    assert.equal(spawnSync(process.execPath, ['--version'], { encoding: 'utf8' }).stdout.trim(), expected);
  });

  it('engines lists LTS lines only (even majors, each ^N.0.0), the oldest matching @types/node', () => {
    assert.ok(engineMajors.length > 0 && engineMajors.every((major) => Number.isInteger(major) && major % 2 === 0), `engines.node ${pkg.engines.node}`);
    assert.equal(Number(/^\^(\d+)\./.exec(pkg.devDependencies['@types/node'] ?? '')?.[1]), Math.min(...engineMajors));
  });

  it("the Dockerfile ships the newest line engines lists, and scripts/lts-node.sh fetches that line's build", () => {
    const newest = Math.max(...engineMajors);
    assert.equal(Number(/^ARG NODE_MAJOR=(\d+)$/m.exec(read('Dockerfile'))?.[1]), newest);
    assert.equal(Number(/NODE_LTS_VERSION=\$\{NODE_LTS_VERSION:-(\d+)\.\d+\.\d+\}/.exec(read('scripts/lts-node.sh'))?.[1]), newest);
  });
});
