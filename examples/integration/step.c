/* A curv optimizer from C: build the library, then compile and run this file.
 *
 *   curv build --lib examples/optimizers/adam.curv -o build/adam
 *   cc -I build/adam examples/integration/step.c -L build/adam -ladam -Wl,-rpath,build/adam -o step
 *   ./step
 *
 * The parameters and gradients live in the caller's memory and are described as DLPack tensors;
 * each step updates the parameters in place. Errors come back as codes with a message. */
#include <stdio.h>
#include <stdlib.h>
#include "adam.h"

static DLManagedTensor tensor(float *data, int64_t *shape, int32_t ndim) {
  DLManagedTensor managed = {0};
  managed.dl_tensor.data = data;
  managed.dl_tensor.device.device_type = 1; /* kDLCPU */
  managed.dl_tensor.ndim = ndim;
  managed.dl_tensor.dtype.code = 2; /* kDLFloat */
  managed.dl_tensor.dtype.bits = 32;
  managed.dl_tensor.dtype.lanes = 1;
  managed.dl_tensor.shape = shape;
  return managed;
}

int main(void) {
  struct curv_config *config = curv_config_new();
  curv_config_set(config, "lr", 0.01);
  struct curv_context *context = curv_context_new(config);
  curv_config_free(config);
  if (curv_context_error(context)) {
    fprintf(stderr, "error: %s\n", curv_context_error(context));
    return 1;
  }
  int64_t count = curv_param_count(context);
  int64_t shapes[8][4];
  float *params[8], *grads[8];
  DLManagedTensor param_tensors[8], grad_tensors[8];
  DLManagedTensor *param_list[8], *grad_list[8];
  for (int64_t i = 0; i < count && i < 8; i++) {
    int64_t rank = curv_param_shape(context, i, shapes[i], 4);
    int64_t size = 1;
    for (int64_t d = 0; d < rank; d++) size *= shapes[i][d];
    params[i] = calloc((size_t)size, sizeof(float));
    grads[i] = malloc((size_t)size * sizeof(float));
    /* Minimise sum((p - 1)^2): the gradient is 2 (p - 1). */
    param_tensors[i] = tensor(params[i], shapes[i], (int32_t)rank);
    grad_tensors[i] = tensor(grads[i], shapes[i], (int32_t)rank);
    param_list[i] = &param_tensors[i];
    grad_list[i] = &grad_tensors[i];
  }
  for (int step = 0; step < 300; step++) {
    for (int64_t i = 0; i < count; i++) {
      int64_t size = 1;
      for (int32_t d = 0; d < param_tensors[i].dl_tensor.ndim; d++) size *= shapes[i][d];
      for (int64_t j = 0; j < size; j++) grads[i][j] = 2.0f * (params[i][j] - 1.0f);
    }
    if (curv_optimizer_step(context, count, param_list, grad_list) != CURV_OK) {
      fprintf(stderr, "error: %s\n", curv_context_error(context));
      return 1;
    }
  }
  printf("%s[0] after %lld steps: %.4f\n", curv_param_name(context, 0), (long long)curv_optimizer_steps(context), params[0][0]);
  /* A misuse: one tensor short. */
  int code = curv_optimizer_step(context, count - 1, param_list, grad_list);
  printf("a short list: code %d (%s)\n", code, curv_context_error(context));
  curv_context_free(context);
  return 0;
}
