static inline __attribute__((always_inline)) int square(int x) { return x * x; }
__attribute__((noinline)) int leaf(int x) { return square(x) + 1; }
__attribute__((noinline)) int middle(int x) { return leaf(x) * 3; }
void _start(void) { volatile int r = middle(7); (void)r; for (;;) {} }
