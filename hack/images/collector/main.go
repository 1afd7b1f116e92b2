// collector is a test client for pods on the local node: it calls the operator's verify endpoint
// with a token the way a real consumer would, every 100 ms, and counts the answers, so a test can
// ask "did any request fail while the token rotated?" by reading /counts.
//
//	collector --url URL (--token-file FILE | --token-env VAR) [--ca FILE] [--server-name NAME]
//	          [--listen ADDR] [--interval DURATION] [--scope SCOPE]... [--audience AUD] [--no-keep-alive]
//
// --token-file is a mounted Secret key: the file is re-read every 100 ms, so a token rotated by
// the operator (the kubelet swaps the volume's ..data symlink) is picked up without a restart.
// --token-env reads the token once from an environment variable (a Deployment's secretKeyRef:
// a new token needs a new pod). --ca (a mounted ConfigMap key, e.g. ca.crt) is re-read the same
// way and a new CA is used for new connections.
//
// Every call is POST URL/v1/verify with {"token": ...}. GET ADDR/counts returns JSON: requests,
// ok (2xx), codes (non-2xx by status), reasons (non-2xx by "status reason"), errors (no answer),
// skipped (no token or no CA yet),
// the token id in use and since when, and the same counts per token period. The token itself is
// never printed, logged or served: only its id (the 8 characters after the prefix's underscore).
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

// period is the counts of one token, from the moment it was first used.
type period struct {
	TokenID  string         `json:"tokenId"`
	Since    time.Time      `json:"since"`
	Requests int64          `json:"requests"`
	OK       int64          `json:"ok"`
	Codes    map[string]int `json:"codes"`
	Errors   int64          `json:"errors"`
}

// counts is what /counts serves.
type counts struct {
	Started         time.Time      `json:"started"`
	Requests        int64          `json:"requests"`
	OK              int64          `json:"ok"`
	Codes           map[string]int `json:"codes"`
	Reasons         map[string]int `json:"reasons"`
	Errors          int64          `json:"errors"`
	LastError       string         `json:"lastError,omitempty"`
	FirstFailureAt  *time.Time     `json:"firstFailureAt,omitempty"`
	LastFailureAt   *time.Time     `json:"lastFailureAt,omitempty"`
	LastStatus      int            `json:"lastStatus"`
	TokenID         string         `json:"tokenId"`
	TokenSince      *time.Time     `json:"tokenSince,omitempty"`
	TokenChanges    int            `json:"tokenChanges"`
	TokenError      string         `json:"tokenError,omitempty"`
	CAChanges       int            `json:"caChanges"`
	Periods         []*period      `json:"periods"`
	Skipped         int64          `json:"skipped"`
	IntervalSeconds float64        `json:"intervalSeconds"`
}

type state struct {
	mu sync.Mutex
	c  counts
}

func main() {
	var (
		target     = flag.String("url", "", "base URL of the verification service, e.g. https://198.19.0.12 (required)")
		tokenFile  = flag.String("token-file", "", "file holding the token (a mounted Secret key); re-read when it changes")
		tokenEnv   = flag.String("token-env", "", "environment variable holding the token (read once)")
		caFile     = flag.String("ca", "", "PEM file of the CA to trust (a mounted ConfigMap key); required for https")
		serverName = flag.String("server-name", "", "name to check in the server's certificate (default: the URL's host)")
		listen     = flag.String("listen", ":8081", "address serving GET /counts and /healthz")
		interval   = flag.Duration("interval", 100*time.Millisecond, "time between calls")
		audience   = flag.String("audience", "", "audience to send with each call")
		noKeep     = flag.Bool("no-keep-alive", false, "a new connection per call (spreads calls over a Service's endpoints)")
		scopes     listFlag
	)
	flag.Var(&scopes, "scope", "scope to require with each call (repeatable)")
	flag.Parse()
	log.SetFlags(log.LUTC | log.Ldate | log.Ltime | log.Lmicroseconds)
	log.SetPrefix("collector: ")

	u, err := url.Parse(*target)
	if *target == "" || err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		fail("--url must be an http:// or https:// URL, e.g. https://198.19.0.12:443 (got %q)", *target)
	}
	if (*tokenFile == "") == (*tokenEnv == "") {
		fail("give exactly one of --token-file FILE and --token-env VAR")
	}
	if u.Scheme == "https" && *caFile == "" {
		fail("--ca FILE is required for an https URL (the image holds no CA certificates)")
	}
	if *interval <= 0 {
		fail("--interval must be positive")
	}
	name := *serverName
	if name == "" {
		name = u.Hostname()
	}
	endpoint := strings.TrimRight(*target, "/") + "/v1/verify"

	s := &state{c: counts{Started: time.Now().UTC(), Codes: map[string]int{}, Reasons: map[string]int{},
		Periods: []*period{}, IntervalSeconds: interval.Seconds()}}
	src := &sources{tokenFile: *tokenFile, caFile: *caFile, serverName: name, keepAlive: !*noKeep, state: s}
	if *tokenEnv != "" {
		tok := strings.TrimSpace(os.Getenv(*tokenEnv))
		if tok == "" {
			fail("environment variable %s is empty or unset", *tokenEnv)
		}
		src.setToken(tok)
	}
	if u.Scheme == "http" {
		src.client = newClient(nil, name, src.keepAlive)
	}
	src.refresh()

	mux := http.NewServeMux()
	mux.HandleFunc("/counts", func(w http.ResponseWriter, _ *http.Request) {
		s.mu.Lock()
		body, err := json.MarshalIndent(&s.c, "", "  ")
		s.mu.Unlock()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(append(body, '\n'))
	})
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok\n") })
	srv := &http.Server{Addr: *listen, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
			fail("serving %s: %v", *listen, err)
		}
	}()

	body := map[string]any{}
	if len(scopes) > 0 {
		body["scopes"] = []string(scopes)
	}
	if *audience != "" {
		body["audience"] = *audience
	}
	log.Printf("calling %s every %s (server name %s), counts on %s/counts", endpoint, *interval, name, *listen)

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	// Files are polled every 100 ms whatever the call interval, so a change is seen promptly.
	poll := time.NewTicker(100 * time.Millisecond)
	calls := time.NewTicker(*interval)
	defer poll.Stop()
	defer calls.Stop()
	for {
		select {
		case <-stop:
			log.Printf("stopping")
			_ = srv.Close()
			return
		case <-poll.C:
			src.refresh()
		case <-calls.C:
			src.call(endpoint, body)
		}
	}
}

// sources holds what the calls use: the token (and its id) and the HTTP client built on the CA.
type sources struct {
	tokenFile, caFile, serverName string
	keepAlive                     bool
	state                         *state

	token, tokenRaw string
	tokenErr        string
	caPEM           []byte
	caErr           string
	client          *http.Client
	lastOutcome     string
}

// refresh re-reads the token and CA files; a read error keeps what was read before.
func (s *sources) refresh() {
	if s.tokenFile != "" {
		raw, err := os.ReadFile(s.tokenFile)
		switch {
		case err != nil:
			s.tokenError(fmt.Sprintf("reading %s: %v", s.tokenFile, err))
		case strings.TrimSpace(string(raw)) == "":
			s.tokenError(fmt.Sprintf("%s is empty", s.tokenFile))
		case string(raw) != s.tokenRaw:
			s.tokenRaw = string(raw)
			s.tokenError("")
			s.setToken(strings.TrimSpace(string(raw)))
		}
	}
	if s.caFile != "" {
		pem, err := os.ReadFile(s.caFile)
		if err != nil {
			s.caError(fmt.Sprintf("reading %s: %v", s.caFile, err))
			return
		}
		if bytes.Equal(pem, s.caPEM) {
			return
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			s.caError(fmt.Sprintf("%s holds no PEM certificate", s.caFile))
			return
		}
		first := s.caPEM == nil
		s.caPEM, s.caErr = pem, ""
		if s.client != nil {
			s.client.CloseIdleConnections()
		}
		s.client = newClient(pool, s.serverName, s.keepAlive)
		if !first {
			s.state.mu.Lock()
			s.state.c.CAChanges++
			s.state.mu.Unlock()
			log.Printf("CA changed (%s): new connections trust it", s.caFile)
		}
	}
}

func (s *sources) tokenError(msg string) {
	if msg != s.tokenErr && msg != "" {
		log.Printf("token: %s (still using token id %q)", msg, tokenID(s.token))
	}
	s.tokenErr = msg
	s.state.mu.Lock()
	s.state.c.TokenError = msg
	s.state.mu.Unlock()
}

func (s *sources) caError(msg string) {
	if msg != s.caErr {
		log.Printf("CA: %s", msg)
	}
	s.caErr = msg
}

func (s *sources) setToken(tok string) {
	if tok == s.token {
		return
	}
	old := tokenID(s.token)
	s.token = tok
	id := tokenID(tok)
	now := time.Now().UTC()
	c := &s.state.c
	s.state.mu.Lock()
	if old != "" {
		c.TokenChanges++
	}
	c.TokenID, c.TokenSince = id, &now
	c.Periods = append(c.Periods, &period{TokenID: id, Since: now, Codes: map[string]int{}})
	s.state.mu.Unlock()
	if old == "" {
		log.Printf("token id %s in use", id)
	} else {
		log.Printf("token changed: id %s -> %s", old, id)
	}
}

// tokenID is the token's public handle: the 8 characters after the prefix's underscore (the last
// one: a prefix may hold underscores, the base62 part never does).
func tokenID(tok string) string {
	if tok == "" {
		return ""
	}
	i := strings.LastIndexByte(tok, '_')
	if i < 0 || len(tok)-i-1 < 8 {
		return "malformed"
	}
	return tok[i+1 : i+9]
}

func newClient(pool *x509.CertPool, serverName string, keepAlive bool) *http.Client {
	tr := &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: pool, ServerName: serverName, MinVersion: tls.VersionTLS12},
		DialContext:       (&net.Dialer{Timeout: 2 * time.Second}).DialContext,
		DisableKeepAlives: !keepAlive,
		ForceAttemptHTTP2: false,
	}
	return &http.Client{Transport: tr, Timeout: 5 * time.Second}
}

// call makes one verification and counts its outcome against the token period it used.
func (s *sources) call(endpoint string, body map[string]any) {
	if s.token == "" || s.client == nil {
		s.state.mu.Lock()
		s.state.c.Skipped++
		s.state.mu.Unlock()
		return
	}
	body["token"] = s.token
	payload, _ := json.Marshal(body)
	delete(body, "token")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, bytes.NewReader(payload))
	if err != nil {
		fail("building the request: %v", err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := s.client.Do(req)
	status, reason, errText := 0, "", ""
	if err != nil {
		// The error names the URL and the cause, never the body (which holds the token).
		errText = err.Error()
	} else {
		status = resp.StatusCode
		raw, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		_ = resp.Body.Close()
		var answer struct {
			Reason string `json:"reason"`
		}
		if json.Unmarshal(raw, &answer) == nil {
			reason = answer.Reason
		}
	}

	now := time.Now().UTC()
	s.state.mu.Lock()
	c := &s.state.c
	p := c.Periods[len(c.Periods)-1]
	c.Requests++
	p.Requests++
	c.LastStatus = status
	switch {
	case status >= 200 && status < 300:
		c.OK++
		p.OK++
	default:
		if status == 0 {
			c.Errors++
			p.Errors++
			c.LastError = errText
		} else {
			code := strconv.Itoa(status)
			c.Codes[code]++
			p.Codes[code]++
			c.Reasons[strings.TrimSpace(code+" "+reason)]++
		}
		if c.FirstFailureAt == nil {
			c.FirstFailureAt = &now
		}
		c.LastFailureAt = &now
	}
	s.state.mu.Unlock()
	// One line per change of outcome (or of token), not per call.
	outcome := strings.TrimSpace(strconv.Itoa(status) + " " + reason)
	if status == 0 {
		outcome = "no answer"
	}
	if outcome+p.TokenID != s.lastOutcome {
		s.lastOutcome = outcome + p.TokenID
		if status == 0 {
			outcome += ": " + errText
		}
		log.Printf("verify with token id %s: %s", p.TokenID, outcome)
	}
}

func fail(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "collector: "+format+"\n", a...)
	os.Exit(1)
}
