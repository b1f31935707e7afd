/* Run a kernel's shares of work, one per thread: worker(jobs + t * job_size) for each t. */
#ifndef SHARDSERVE_RUN_SHARES_H
#define SHARDSERVE_RUN_SHARES_H

#include <pthread.h>
#include <stddef.h>

#define MAX_THREADS 64

static void run_shares(void *(*worker)(void *), void *jobs, size_t job_size, int num_threads) {
    char *job = jobs;
#ifdef _OPENMP
    /* Built against the OpenMP runtime torch has loaded: its worker threads run the shares,
     * instead of spinning (as OpenMP threads do between parallel regions) beside ours. */
#pragma omp parallel for num_threads(num_threads) schedule(static, 1)
    for (int t = 0; t < num_threads; t++) worker(job + t * job_size);
#else
    pthread_t threads[MAX_THREADS];
    int started = 0;
    for (int t = 1; t < num_threads; t++) {
        if (pthread_create(&threads[t], NULL, worker, job + t * job_size) != 0) break;
        started = t;
    }
    worker(job);
    /* Shares of threads that could not be started are done here. */
    for (int t = started + 1; t < num_threads; t++) worker(job + t * job_size);
    for (int t = 1; t <= started; t++) pthread_join(threads[t], NULL);
#endif
}

#endif
