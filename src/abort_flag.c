/*
 * A ggml abort callback that reads a flag byte the engine owns.
 *
 * llama.cpp polls its abort callback once per graph node during llama_decode. A ctypes
 * callback takes the GIL for every poll, so any busy Python thread (the executor, a topic
 * flood) slowed prefill down. This one is plain C: the engine passes a pointer to its flag
 * byte as the callback data and a watchdog thread sets the byte at the deadline or on cancel.
 */
#include <stdbool.h>

bool nemotron_ros_abort_requested(void * flag)
{
  return flag != 0 && __atomic_load_n((const unsigned char *) flag, __ATOMIC_RELAXED) != 0;
}
