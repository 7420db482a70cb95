/*
 * A light stand-in data worker for the fleet benchmarks.
 *
 * quil-simnode is a Python process of about 12 MB, so 200 hosts with 64
 * workers each would need 150 GB. This program keeps the part of the node's
 * command line the agent relies on and little else:
 *
 *   lightworker --config DIR --core N --parent-process PID
 *
 * With N >= 1 it reads DIR/config.yml, takes entry N-1 of
 * engine.dataWorkerMultiaddrs (/ip4/ADDR/tcp/PORT, block or flow list),
 * listens there, and accepts and closes connections. With N = 0 (the control
 * process) it listens nowhere. Either way it exits once PID is gone (checked
 * every second, as the real worker does) or on SIGTERM.
 * Flags may be written -flag or --flag, with the value after a space or "=".
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static const char *flag_value(int argc, char **argv, int *i, const char *name) {
    const char *arg = argv[*i];
    while (*arg == '-') arg++;
    size_t len = strlen(name);
    if (strncmp(arg, name, len) != 0) return NULL;
    if (arg[len] == '=') return arg + len + 1;
    if (arg[len] == '\0' && *i + 1 < argc) return argv[++*i];
    return NULL;
}

/* Find entry `index` (0-based) of dataWorkerMultiaddrs in text; fill addr and port. */
static int find_entry(const char *text, int index, char *addr, int *port) {
    const char *key = text;
    /* The key must start a line (comments in the sample config mention it too). */
    while ((key = strstr(key, "dataWorkerMultiaddrs:")) != NULL) {
        const char *line = key;
        while (line > text && line[-1] == ' ') line--;
        if (line == text || line[-1] == '\n') break;
        key++;
    }
    if (key == NULL) return -1;
    const char *p = key + strlen("dataWorkerMultiaddrs:");
    int seen = 0;
    while (*p) {
        const char *entry = strstr(p, "/ip4/");
        if (entry == NULL) return -1;
        /* Stop at a following key: a line that is neither blank nor a list item. */
        for (const char *q = p; q < entry; q++) {
            if (*q == '\n') {
                const char *r = q + 1;
                while (*r == ' ') r++;
                if (r < entry && *r != '-' && *r != '\n' && *r != '#') return -1;
            }
        }
        if (seen == index) {
            return sscanf(entry, "/ip4/%63[0-9.]/tcp/%d", addr, port) == 2 ? 0 : -1;
        }
        seen++;
        p = entry + 5;
    }
    return -1;
}

static char *read_file(const char *path) {
    FILE *file = fopen(path, "r");
    if (file == NULL) return NULL;
    size_t size = 0, cap = 65536;
    char *buffer = malloc(cap + 1);
    size_t got;
    while (buffer && (got = fread(buffer + size, 1, cap - size, file)) > 0) {
        size += got;
        if (size == cap) buffer = realloc(buffer, (cap *= 2) + 1);
    }
    fclose(file);
    if (buffer) buffer[size] = '\0';
    return buffer;
}

static int listen_on(const char *addr, int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (inet_pton(AF_INET, addr, &sa.sin_addr) != 1 || bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0 ||
        listen(fd, 64) != 0) {
        fprintf(stderr, "panic: cannot listen on %s:%d: %s\n", addr, port, strerror(errno));
        exit(2);
    }
    return fd;
}

int main(int argc, char **argv) {
    const char *config = ".config";
    int core = 0, parent = 0;
    for (int i = 1; i < argc; i++) {
        const char *value;
        if ((value = flag_value(argc, argv, &i, "config"))) config = value;
        else if ((value = flag_value(argc, argv, &i, "core"))) core = atoi(value);
        else if ((value = flag_value(argc, argv, &i, "parent-process"))) parent = atoi(value);
    }
    signal(SIGPIPE, SIG_IGN);
    int fd = -1;
    if (core >= 1) {
        char path[4096], addr[64];
        int port;
        snprintf(path, sizeof path, "%s/config.yml", config);
        char *text = read_file(path);
        if (text == NULL || find_entry(text, core - 1, addr, &port) != 0) {
            fprintf(stderr, "panic: no worker list entry for core %d in %s\n", core, path);
            return 2;
        }
        free(text);
        fd = listen_on(addr, port);
        printf("data worker listening on /ip4/%s/tcp/%d (core %d)\n", addr, port, core);
        fflush(stdout);
    }
    struct pollfd watch = {.fd = fd, .events = POLLIN};
    for (;;) {
        int ready = poll(&watch, fd >= 0 ? 1 : 0, 1000);
        if (ready > 0) {
            int conn = accept(fd, NULL, NULL);
            if (conn >= 0) close(conn);
        }
        if (parent > 0 && kill(parent, 0) != 0) return 1;
    }
}
