// A release that may be called from more than one path (a write's callback and a close, an error
// and an end) and must give back what it holds only once.

/** `action`, run on the first call of the returned function only. */
export function once(action: () => void): () => void {
  let done = false;
  return () => {
    if (done) return;
    done = true;
    action();
  };
}
