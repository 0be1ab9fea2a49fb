/** Rejects with `make()` at `deadline` (performance.now() ms) unless settled before. */
export function within<T>(promise: Promise<T>, deadline: number, make: () => Error): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => reject(make()), Math.max(0, deadline - performance.now()));
    promise.then(
      (v) => {
        clearTimeout(timer);
        resolve(v);
      },
      (e: unknown) => {
        clearTimeout(timer);
        reject(e);
      },
    );
  });
}
