import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';

export const CLI = fileURLToPath(new URL('../../src/cli.js', import.meta.url));

export function runCli(args: string[], env: NodeJS.ProcessEnv = {}): { status: number | null; stdout: string; stderr: string } {
  const result = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 30_000, env: { ...process.env, ...env } });
  return { status: result.status, stdout: result.stdout, stderr: result.stderr };
}

export interface RunningCli {
  readonly child: ChildProcess;
  /** Everything it wrote so far, stdout and stderr together. */
  output(): string;
  /** Resolves once its output satisfies `done`; rejects when it exits first or after `timeoutMs`. */
  waitForOutput(done: (output: string) => boolean, timeoutMs?: number): Promise<void>;
}

/** Starts a long-running subcommand and resolves once `ready` matches its combined output. */
export function startCli(args: string[], ready: RegExp, timeoutMs = 20_000, env: NodeJS.ProcessEnv = {}): Promise<RunningCli> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
    let output = '';
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`timed out waiting for ${ready}; output:\n${output}`));
    }, timeoutMs);
    const waitForOutput = (done: (output: string) => boolean, waitMs = 20_000) =>
      new Promise<void>((settle, fail) => {
        const check = () => {
          if (!done(output)) return false;
          stopWaiting();
          settle();
          return true;
        };
        const onExit = (code: number | null) => {
          stopWaiting();
          fail(new Error(`exited with ${code} while waiting; output:\n${output}`));
        };
        const onTimeout = setTimeout(() => {
          stopWaiting();
          fail(new Error(`timed out waiting for its output; output:\n${output}`));
        }, waitMs);
        const stopWaiting = () => {
          clearTimeout(onTimeout);
          child.stdout.off('data', check);
          child.stderr.off('data', check);
          child.off('exit', onExit);
        };
        if (check()) return;
        // After onData has appended the chunk: listeners run in the order they were added.
        child.stdout.on('data', check);
        child.stderr.on('data', check);
        child.once('exit', onExit);
      });
    const onData = (chunk: Buffer) => {
      output += chunk.toString();
      if (ready.test(output)) {
        clearTimeout(timer);
        resolve({ child, output: () => output, waitForOutput });
      }
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`exited with ${code} before ready; output:\n${output}`));
    });
  });
}

export function exitOf(child: ChildProcess): Promise<number | null> {
  return new Promise((resolve) => {
    if (child.exitCode !== null) resolve(child.exitCode);
    else child.once('exit', (code) => resolve(code));
  });
}
